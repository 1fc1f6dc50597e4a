"""Neutral text for the fluency guard: plain prose, no task, scored whole."""

NEUTRAL_TEXTS = [
    "The river ran slowly past the mill, and in the evening the farmers led their cows "
    "down to the water before the light was gone.",
    "When the library opened its new reading room, students came early to find a seat "
    "by the tall windows that looked over the square.",
    "The bakery on the corner sells bread, rolls and small cakes, and on Sundays the queue "
    "reaches all the way to the post office.",
    "A strong wind blew from the north all night, so the fishermen stayed in the harbour "
    "and mended their nets until the sea was calm again.",
    "Every spring the school holds a fair in the park, with games for the children, music "
    "from a local band and tables full of homemade food.",
    "The old bridge was closed for repairs, and drivers had to take the long road around "
    "the hill to reach the market in the next town.",
    "She planted tomatoes, beans and herbs in the garden behind the house, and by the end "
    "of the summer there was more than the family could eat.",
    "The museum keeps a collection of clocks from many countries, and at noon they all "
    "strike together in a long and noisy chorus.",
]

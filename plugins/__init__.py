"""Built-in analysis families, each registered through the `headscope` entry-point
group exactly as a third-party package is (see pyproject.toml).

A family is a package holding its science, its data and its helpers; families
never import each other. What two families need lives in `headscope.core`.
"""

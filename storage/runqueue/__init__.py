"""The run queue in PostgreSQL, for runs that worker processes on many machines take.

`backend` holds the queue itself (procrastinate in its own schema of the findings
database) and what a front end uses to enqueue and cancel runs; `worker` is the
`headscope worker` process. Nothing here imports the store: it is handed in.
"""

"""What a run takes in before the model call: what lives here.

    message.py   the queue message: which task and run (the request is read from the task row)
    fetch.py     image references to bytes, by scheme (sources/: one module per kind of reference)
    images.py    validation by content, downscaling, the 28-pixel token count: pure functions over bytes
    memory.py    the decode memory budget of a worker process
    prompt.py    the chat messages sent to QVQ, and the token budget check before the call
"""

"""Callbacks: the terminal event POSTed to a job's callback_url, signed, durably. What lives here.

    post.py         one signed POST, through the SSRF guard: its outcome (delivered, retry, gone, refused)
    deliveries.py   a delivery's life: recorded when the task ends, claimed for each try, due again later
    scheduler.py    the thread that sends deliveries when they come due
"""

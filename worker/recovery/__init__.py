"""Keeping a task running once, and bringing it back when its worker dies: what lives here.

    lease.py    per-task leases in Redis: which worker runs a task right now
    cancel.py   hearing a cancel and enforcing the time limit: a running stream is closed at once
    sweep.py    recovery from leases: orphaned tasks, lost queue messages, logs without their end
"""

"""Flow control, fleet-wide through Redis: what lives here.

    control.py    FlowControl: the pipeline's two hooks (around a run, around each model call)
    limiter.py    the model limiter: requests and tokens per second and minute, fair across tenants
    fairness.py   tenant slots (concurrency) and tenant rate (requests per minute)
    budget.py     tenant budgets by reservation, in exact money
    parking.py    tasks waiting for a tenant slot, parked in Redis and moved back to the queue when due
"""

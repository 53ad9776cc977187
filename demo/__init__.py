"""``bedside demo``: a whole federation on one machine. Sits above edge and aggregator: it runs
them as separate processes and only reads what they publish."""

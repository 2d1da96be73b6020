"""Quotas and budgets: reservations against limits, leases, prices and costs."""

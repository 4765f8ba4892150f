"""Measurement: pure metric functions, in-loop evaluation, reports and plots."""

"""Deployment and monitoring configuration (README.md here says what each folder holds).

A package so that ``prometheus/`` ships in the wheel as package data: ``alexray dashboard
--start-prometheus`` (orchestrator/prometheus.py) reads its config and rule files wherever alexray
is installed, not only in a checkout.
"""

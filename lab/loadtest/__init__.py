"""The open-loop load test (MEASUREMENT.md, 'Load tests'): seeded schedule, clients, statistics, sweep."""

"""Load-test stage: Locust scenarios and the runner that writes latency/throughput reports."""

"""Operating the PDP and the executor: Prometheus metrics, JSON logs with request ids, OpenTelemetry traces.

:mod:`.metrics` the series and the calls that record them; :mod:`.collectors` gauges computed at scrape time;
:mod:`.exposition` serving them; :mod:`.logs` log lines; :mod:`.tracing` spans.
"""

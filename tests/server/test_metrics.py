"""/metrics: Prometheus text format written by hand (checked line by line on a known set of
observations), and live figures that agree with what the requests returned."""
from __future__ import annotations

import httpx
import pytest

from bitfold.server.metrics import Counter, EngineStats, Histogram, Metrics, parse_metrics

pytestmark = pytest.mark.usefixtures("single_thread")


def test_histogram_and_counter_text():
    h = Histogram("x_seconds", "help text", (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.render() == ["# HELP x_seconds help text", "# TYPE x_seconds histogram", 'x_seconds_bucket{le="0.1"} 2',
                          'x_seconds_bucket{le="1"} 3', 'x_seconds_bucket{le="+Inf"} 4', "x_seconds_sum 3.65",
                          "x_seconds_count 4"]
    c = Counter("y_total", "h")
    assert c.render()[-1] == "y_total 0"
    c.inc(code="200", endpoint='/a"b')
    c.inc(2, endpoint='/a"b', code="200")
    assert c.render()[-1] == 'y_total{code="200",endpoint="/a\\"b"} 3'


def test_render_parses_and_has_every_family():
    stats = EngineStats(running=2, waiting=5, kv_blocks_total=10, kv_blocks_free=4, block_size=16)
    text = Metrics().render(stats, True)
    m = parse_metrics(text)
    assert m["bitfold_requests_waiting"] == 5 and m["bitfold_kv_blocks_used"] == 6 and m["bitfold_kv_blocks_free"] == 4
    assert m["bitfold_model_ready"] == 1
    for family in ["bitfold_time_to_first_token_seconds", "bitfold_inter_token_latency_seconds",
                   "bitfold_request_latency_seconds"]:
        assert f"# TYPE {family} histogram" in text and m[f"{family}_count"] == 0
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))


def test_live_metrics_match_the_requests(tiny_server):
    before = tiny_server.metrics()
    usage = [0, 0]
    for n, stream in [(5, False), (7, True), (1, False)]:
        body = {"model": "tiny", "prompt": "1 2 3", "max_tokens": n, "ignore_eos": True, "temperature": 0}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
            r = httpx.post(tiny_server.url + "/v1/completions", json=body, timeout=30)
            u = [e for e in r.text.split("\n\n") if '"usage":{' in e]
            assert len(u) == 1
        r = httpx.post(tiny_server.url + "/v1/completions", json={**body, "stream": False, "stream_options": None},
                       timeout=30)
        usage[0] += r.json()["usage"]["prompt_tokens"] * (2 if stream else 1)
        usage[1] += r.json()["usage"]["completion_tokens"] * (2 if stream else 1)
    after = tiny_server.wait_idle()

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert delta("bitfold_prompt_tokens_total") == usage[0]
    assert delta("bitfold_generation_tokens_total") == usage[1] == 20
    assert delta("bitfold_time_to_first_token_seconds_count") == 4
    assert delta("bitfold_inter_token_latency_seconds_count") == usage[1] - 4  # every token after the first
    assert delta('bitfold_requests_finished_total{finish_reason="length"}') == 4
    assert delta('bitfold_http_requests_total{code="200",endpoint="/v1/completions"}') == 4
    assert after["bitfold_kv_blocks_total"] == 256 and after["bitfold_kv_block_size_tokens"] == 16

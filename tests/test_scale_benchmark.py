"""``benchmarks/scale.py --quick``: the table and the projection have their columns and rows
(shape only: timings and memory go in benchmarks/RESULTS.md, never in tests)."""

from __future__ import annotations

import json

from benchmarks import scale


def test_quick_scale_benchmark_prints_the_table_and_the_projection(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert scale.main(["--quick", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    header = "| " + " | ".join(scale.COLUMNS) + " |"
    assert header in text
    results = json.loads(out.read_text())
    assert [r["label"] for r in results] == ["1/2000", "1/500"]
    assert [r["members"] for r in results] == [
        sum(scale.members_per_video(n) for n in scale.frame_counts(r["videos"])) for r in results]
    lines = text.splitlines()
    start = lines.index(header)
    rows = lines[start + 2 : start + 2 + len(results)]
    assert all(len(row.split("|")) == len(scale.COLUMNS) + 2 for row in rows)
    for r in results:  # every figure of a rank was measured
        for key in ("import_mb", "index_s", "index_cpu_s", "index_mb", "first_batch_s",
                    "steps_per_s", "pickled_mb"):
            assert isinstance(r["rank"][key], float), key
    start = next(i for i, line in enumerate(lines) if line.startswith("| figure |"))
    projected = lines[start + 2 : start + 2 + len(scale.PROJECTED)]
    assert [line.split("|")[1].strip() for line in projected] == [p[0] for p in scale.PROJECTED]
    assert all(len(line.split("|")) == 7 for line in projected)
    assert [r["shards"] for r in results] == [1, 1] and [r["videos"] for r in results] == [7, 27]


def test_growth_fit_gives_the_exponent_and_projects_linearly():
    b, projected = scale.fit([1e5, 1e6, 1e7], [1.0, 10.0, 100.0])
    assert abs(b - 1) < 1e-9 and abs(projected - 100.0 * scale.KINETICS_MEMBERS / 1e7) < 1e-6
    b, projected = scale.fit([1e5, 1e6], [3.0, 3.1], rate=True)
    assert abs(b) < 0.2 and projected == 3.1  # a rate: the value at the largest set
    b, projected = scale.fit([1e5, 1e6], [10.0, 19.0])  # 9 per 900,000 members on top of 9
    assert 0.2 < b < 1 and abs(projected - (9.0 + 1e-5 * scale.KINETICS_MEMBERS)) < 1e-6
    assert scale.fit([1e5], [1.0]) is None

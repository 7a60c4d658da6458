"""Trace loaders, reshaping, the cluster configuration and the `shoal sim` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from simulator.config import load_config
from simulator.workload import TraceError, load_trace, reshape

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[3] / "simulator" / "examples"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_mooncake_rows_keep_their_block_hashes(tmp_path: Path) -> None:
    trace = write(
        tmp_path / "m.jsonl",
        '{"timestamp": 1000, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]}\n'
        '{"timestamp": 1500, "input_length": 600, "output_length": 0, "hash_ids": [0, 3]}\n',
    )
    workload = load_trace(trace, "mooncake")
    first, second = workload.requests
    assert (first.at, first.prompt_tokens, first.output_tokens) == (0.0, 1100, 5)
    assert second.at == pytest.approx(0.5) and second.output_tokens == 1
    assert second.hashes[0] == first.hashes[0] and second.hashes[1] != first.hashes[1]
    assert workload.block_size == 512


def test_azure_and_burstgpt_rows_carry_lengths_only(tmp_path: Path) -> None:
    azure = write(
        tmp_path / "a.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,4808,10\n2023-11-16 18:17:05.4799600,100,3\n",
    )
    burst = write(
        tmp_path / "b.csv",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n7.5,GPT-4,1087,0,1087,API log\n",
    )
    a = load_trace(azure, "azure").requests
    assert [(r.at, r.prompt_tokens, r.output_tokens) for r in a] == [(0.0, 4808, 10), (pytest.approx(1.5), 100, 3)]
    b = load_trace(burst, "burstgpt").requests
    assert [(r.at, r.prompt_tokens, r.output_tokens) for r in b] == [(0.0, 472, 18), (2.5, 1087, 1)]
    assert not any(r.hashes for r in a + b)


@pytest.mark.parametrize(
    ("fmt", "text", "where"),
    [
        (
            "mooncake",
            '{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 1}\n',
            ":2: field 'input_length'",
        ),
        ("azure", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,x,1\n", ":2: invalid literal"),
        ("burstgpt", "Timestamp,Request tokens,Response tokens\n1,-4,2\n", ":2: Request tokens is negative"),
    ],
)
def test_bad_rows_are_refused_with_file_and_line(tmp_path: Path, fmt: str, text: str, where: str) -> None:
    trace = write(tmp_path / "t", text)
    with pytest.raises(TraceError, match=f"{trace}{where}"):
        load_trace(trace, fmt)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ('{"timestamp": 0, "input_length": 5, "output_length": 2, "hash_ids": [1]}\n', (5, 2)),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,7,3\n", (7, 3)),
        ('"Timestamp","Model","Request tokens","Response tokens"\n5,gpt,9,4\n', (9, 4)),
    ],
)
def test_the_format_is_told_from_the_first_line(tmp_path: Path, text: str, tokens: tuple[int, int]) -> None:
    (request,) = load_trace(write(tmp_path / "trace.txt", text)).requests  # the extension says nothing
    assert (request.prompt_tokens, request.output_tokens) == tokens


def test_a_trace_of_no_known_format_is_refused_naming_the_file(tmp_path: Path) -> None:
    trace = write(tmp_path / "t.csv", "time,prompt\n1,2\n")
    with pytest.raises(TraceError, match=f"{trace}:1: cannot tell the trace format from 'time,prompt'"):
        load_trace(trace)
    with pytest.raises(TraceError, match=f"{trace}:1: not a JSON object .*--format"):
        load_trace(trace, "mooncake")


def test_unknown_format_and_missing_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown trace format 'csv'"):
        load_trace(tmp_path, "csv")
    with pytest.raises(ValueError, match="does not exist"):
        load_trace(tmp_path / "nope.jsonl", "mooncake")


def mooncake(tmp_path: Path, count: int) -> Path:
    rows = [
        f'{{"timestamp": {i * 100}, "input_length": 700, "output_length": 4, "hash_ids": [{i}, {i + 1}]}}'
        for i in range(count)
    ]
    return write(tmp_path / "m.jsonl", "\n".join(rows) + "\n")


def test_time_scale_compresses_and_rate_scale_thins_or_copies(tmp_path: Path) -> None:
    workload = load_trace(mooncake(tmp_path, 1000), "mooncake")
    faster = reshape(workload, time_scale=4)
    assert len(faster.requests) == 1000 and faster.span_s == pytest.approx(workload.span_s / 4)
    thinned = reshape(workload, rate_scale=0.5, seed=3)
    assert 400 < len(thinned.requests) < 600
    doubled = reshape(workload, rate_scale=2)
    assert len(doubled.requests) == 2000
    assert len({r.hashes for r in doubled.requests}) == 2000  # copies are other users' prompts
    window = reshape(workload, start_s=10, duration_s=5, max_prompt=300, max_output=2)
    assert len(window.requests) == 50 and window.requests[0].at == 0.0
    assert {(r.prompt_tokens, r.output_tokens) for r in window.requests} == {(300, 2)}


def test_the_cluster_file_is_the_controllers_bootstrap_and_refuses_mistakes(tmp_path: Path) -> None:
    config = load_config(EXAMPLES / "pd.yaml")
    assert [p.role.value for p in config.pools] == ["prefill", "decode"]
    document = yaml.safe_load((EXAMPLES / "colocated.yaml").read_text())
    document["pools"][0]["model"] = "other"
    bad = write(tmp_path / "bad.yaml", yaml.safe_dump(document))
    with pytest.raises(ValueError, match="serves unknown model 'other'"):
        load_config(bad)
    document["pools"][0].update(model="mixtral-8x7b", worker_env={"MAX_RUNNING": "0"})
    write(bad, yaml.safe_dump(document))
    with pytest.raises(ValueError, match="pool 'mixed' worker_env: max_running"):
        load_config(bad)
    routing = write(tmp_path / "routing.yaml", "version: v1\npreset: fastest\n")
    with pytest.raises(ValueError, match="unknown routing preset 'fastest'"):
        load_config(EXAMPLES / "colocated.yaml", routing)


def test_shoal_sim_prints_a_table_and_writes_a_plot(tmp_path: Path) -> None:
    runner = CliRunner()
    trace = mooncake(tmp_path, 200)
    result = runner.invoke(
        app,
        [
            "sim",
            "--trace",
            str(trace),
            "--format",
            "mooncake",
            "--policy",
            "routing=round-robin",
            "--policy",
            "scaling=fixed",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "simulating 200 requests" in result.output and "SLO attainment" in result.output
    assert (tmp_path / "out" / "sim.png").stat().st_size > 10_000
    assert '"requests": 200' in (tmp_path / "out" / "metrics.json").read_text()


def test_repeated_policies_run_side_by_side_on_the_same_requests(tmp_path: Path) -> None:
    """Fixed sizes from the command line, compared in one run: no YAML edited."""
    trace = mooncake(tmp_path, 150)
    args = ["sim", "--trace", str(trace), "--out", str(tmp_path / "out")]
    for choice in ("scaling=fixed:1", "scaling=fixed:3", "routing=round-robin"):
        args += ["--policy", choice]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[1]
    assert "scaling=fixed:1 routing=round-robin" in header and "scaling=fixed:3 routing=round-robin" in header
    runs = json.loads((tmp_path / "out" / "metrics.json").read_text())
    one, three = runs["scaling=fixed:1 routing=round-robin"], runs["scaling=fixed:3 routing=round-robin"]
    assert one["requests"] == three["requests"] == 150
    # Three replicas held for the whole span cost three times one replica's worker-seconds.
    assert three["worker_seconds"] == pytest.approx(3 * one["worker_seconds"], rel=0.05)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --trace PATH"),
        (["--synthetic", "rate_rps=5", "--policy", "scaling=predictive:3"], "only fixed takes a size"),
        (["--synthetic", "rate_rps=5", "--policy", "scaling=fixed:many"], "only fixed takes a size"),
        (["--synthetic", "rate_rps=-1"], "--synthetic: rate_rps"),
        (["--synthetic", "rate_rps=5", "--policy", "speed=max"], "expected routing=<preset>"),
        (["--synthetic", "rate_rps=5", "--policy", "scaling=magic"], "--policy 'scaling=magic': unknown scaling"),
        (["--synthetic", "rate_rps=5", "--policy", "routing=magic"], "--policy 'routing=magic': unknown routing"),
    ],
)
def test_shoal_sim_refuses_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["sim", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_a_trace_without_hashes_has_no_hit_rate_and_a_capped_pool_is_named(tmp_path: Path) -> None:
    rows = "".join(f"2023-11-16 18:17:{i // 10:02d}.{i % 10}000000,8000,50\n" for i in range(300))
    trace = write(tmp_path / "azure.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n" + rows)
    document = yaml.safe_load((EXAMPLES / "colocated.yaml").read_text())
    document["pools"][0]["max_replicas"] = 1  # far too few for 10 requests/s of 8k-token prompts
    cluster = write(tmp_path / "cluster.yaml", yaml.safe_dump(document))
    args = ["sim", "--trace", str(trace), "--cluster", str(cluster), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "n/a (no block hashes)" in result.output
    assert "pool mixed sat at its replica cap (1)" in result.output
    # A pool held at a fixed size is where it was told to be: no warning.
    fixed = CliRunner().invoke(app, [*args, "--policy", "scaling=fixed:1"])
    assert fixed.exit_code == 0 and "replica cap" not in fixed.output

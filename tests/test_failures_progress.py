"""Failure summaries (one line per reason, errors.log), the progress reporters and the observed grid."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from rich.console import Console

from flip_fl.experiments.monitor import RunMonitor
from flip_fl.experiments.progress import LiveProgress, PlainProgress, client_timings, make_progress
from flip_fl.experiments.results import flip_work, format_round
from flip_fl.federation.failures import (
    OOM_HINT,
    ErrorLog,
    group_failures,
    no_reply_reason,
    short_reason,
    summary_lines,
)
from flip_fl.federation.loop import exchange
from flip_fl.federation.observe import RoundWatch
from flip_fl.federation.protocol import ClientState, FitResult, check_fit_reply, fit_reply, take_state
from flip_fl.federation.rounds import RoundRecord
from strategies.seeded_fedavg import SeededFedAvg

# The reason of a Flower error reply for a client that raised (as seen on 2026-11-30, Flower 1.42, Ray 2.55).
CLIENT_RAISED = """<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\
\x1b[39m (pid=20896, ip=192.0.2.2, actor_id=e9aac98, repr=<ClientAppActor object>)
                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/work/flip_fl/federation/client_app.py", line 52, in train
    result = client.fit(msg.content.array_records[protocol.ARRAYS].to_torch_state_dict(), task.info)
  File "/tmp/broken_clients.py", line 5, in fit
    raise RuntimeError('disk on fire')
RuntimeError: disk on fire

The above exception was the direct cause of the following exception:

\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=20896, ip=192.0.2.2, actor_id=e9aac98)
  File "/venv/flwr/simulation/ray_transport/ray_actor.py", line 65, in run
    raise ClientAppException(str(ex)) from ex
flwr.clientapp.client_app.ClientAppException:
Exception ClientAppException occurred. Message: disk on fire'>"""

# A Ray out-of-memory kill (provoked with RAY_memory_usage_threshold=0.05), shortened in the middle.
OUT_OF_MEMORY = """<class 'ray.exceptions.OutOfMemoryError'>:<'1 worker(s) were killed due to the node running low \
on memory. Memory on the node (IP: 192.0.2.2, ID: 302c34) was 3.46GB / 23.54GB (0.146970), which exceeds the memory \
usage threshold of 0.050000; Object store memory usage: [- objects spillable: 0; - bytes spillable: 0]; Ray killed 1 \
worker(s) based on the killing policy: [(Task: job ID=01000000, task name=ClientAppActor.__init__, required \
resources={CPU: 1}, pid=15890, actual memory used=0.05GB)]; Top 10 memory users: PID\tMEM(GB)\tCOMMAND, 15805\t0.80\t\
python sim.py; Refer to the documentation on how to address the out of memory issue.'>"""


def test_short_reason_is_the_clients_own_exception_or_an_explained_memory_kill():
    assert short_reason(CLIENT_RAISED) == "RuntimeError: disk on fire"
    assert short_reason(OUT_OF_MEMORY) == "out of memory: Ray killed the client's worker"
    assert short_reason(OUT_OF_MEMORY.replace("3.46GB", "3.50GB")) == short_reason(OUT_OF_MEMORY)  # one group
    assert short_reason(no_reply_reason(30)) == "no reply within resources.round_timeout (30s)"
    long = "ValueError: " + "word " * 100
    cut = short_reason(long)
    assert len(cut) <= 200 and cut.endswith("word…")  # cut at a word boundary, never mid-word
    assert short_reason("") == "unknown error"


def test_one_summary_line_per_reason_with_counts_partitions_and_the_memory_hint(tmp_path: Path):
    failures = {5: CLIENT_RAISED, 3: CLIENT_RAISED, 9: OUT_OF_MEMORY, 11: OUT_OF_MEMORY, 12: no_reply_reason(30)}
    groups = group_failures(failures)
    assert [(g.reason.split(":")[0], g.partitions) for g in groups] == [
        ("RuntimeError", [3, 5]), ("out of memory", [9, 11]), ("no reply within resources.round_timeout (30s)", [12])]
    lines = summary_lines(4, 8, groups, tmp_path / "errors.log")
    assert lines[0] == (f"round 4: 2 of 8 clients failed: 2x RuntimeError: disk on fire (partitions 3, 5); "
                        f"traceback in {tmp_path / 'errors.log'}")
    assert lines[1].startswith("round 4: 2 of 8 clients failed: 2x out of memory: Ray killed")
    assert lines[-1] == f"round 4: {OOM_HINT} (Ray saw 3.46GB of 23.54GB in use)" and "resources.num_cpus" in OOM_HINT
    assert len(lines) == 4 and all("\n" not in line for line in lines)


def test_error_log_keeps_the_first_occurrence_of_each_reason(tmp_path: Path):
    log = ErrorLog(tmp_path / "errors.log")
    for server_round in (1, 2, 3):
        log.record(server_round, group_failures({2: CLIENT_RAISED}))
    log.record(3, group_failures({2: CLIENT_RAISED, 7: OUT_OF_MEMORY}))
    text = log.path.read_text()
    assert text.count("=== round") == 2 and "=== round 1, partitions [2]: RuntimeError: disk on fire" in text
    assert "=== round 3, partitions [7]: out of memory" in text
    assert 'raise RuntimeError(\'disk on fire\')' in text and "\x1b[" not in text  # the traceback, without colours


def test_plain_progress_writes_one_line_per_phase_and_round_and_failures_to_stderr(tmp_path: Path):
    out, err = io.StringIO(), io.StringIO()
    progress = PlainProgress(2, out=out, err=err)
    monitor = RunMonitor(progress, tmp_path)
    monitor.phase("loading data: synthetic")
    row = {"round": 0, "clean_acc": 0.1, "asr": 0.0, "seconds": 0.5}
    progress.round_finished(row)
    monitor.round_started(1, [0, 1, 2], [1])
    monitor.client_replied(1, 0, {"train_seconds": 1.0}, None)
    monitor.client_replied(1, 1, None, CLIENT_RAISED)
    monitor.replies_done(1, {1: CLIENT_RAISED})
    progress.round_finished({**row, "round": 1, "sampled": [0, 1, 2], "malicious": [1], "failures": 1})
    progress.round_finished({**row, "round": 2, "sampled": [0, 1, 2], "malicious": [1]})
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].endswith("] loading data: synthetic")
    assert lines[1].startswith("round   0 | acc 0.1000") and "eta" not in lines[1]
    assert lines[2].startswith("round   1 |") and "FAILURES 1" in lines[2] and " | eta " in lines[2]
    assert lines[3].startswith("round   2 |") and "eta" not in lines[3]
    assert err.getvalue().splitlines() == [f"round 1: 1 of 3 clients failed: 1x RuntimeError: disk on fire "
                                           f"(partition 1); traceback in {tmp_path / 'errors.log'}"]
    assert (tmp_path / "errors.log").is_file()
    assert isinstance(make_progress(2, stream=io.StringIO()), PlainProgress)  # not a terminal: plain lines


def test_plain_progress_shows_the_replies_of_a_slow_round_as_they_arrive(monkeypatch):
    import flip_fl.experiments.progress as progress_module

    now = [1000.0]
    monkeypatch.setattr(progress_module.time, "time", lambda: now[0])
    out = io.StringIO()
    progress = PlainProgress(3, out=out, err=io.StringIO(), slow_after=60.0)
    progress.round_started(2, [3, 4, 6], [4])
    now[0] += 10.0
    progress.client_replied(2, 4, {"train_seconds": 9.0}, None)  # a quick reply: the round line will say it
    assert out.getvalue() == ""
    now[0] += 54.0
    progress.client_replied(2, 3, FLIP_STATS, None)
    progress.client_replied(2, 6, None, CLIENT_RAISED)
    assert out.getvalue().splitlines() == [
        "  round 2, 2/3 replied after 1m04s: client 3: 13.1s (harden 2.3s, invert 3.8s; warm-up, 37 inversion steps, "
        "5/15 triggers found)",
        "  round 2, 3/3 replied after 1m04s: client 6: FAILED"]
    progress.round_started(3, [3, 4, 6], [4])  # a new round starts its own clock
    progress.client_replied(3, 4, {"train_seconds": 9.0}, None)
    assert len(out.getvalue().splitlines()) == 2


def test_live_progress_shows_replies_timings_and_eta():
    console = Console(file=io.StringIO(), force_terminal=True, width=140)
    live = LiveProgress(3, console=console)
    try:
        live.phase("starting Ray")
        assert "starting Ray" in _text(live)
        live.round_finished({"round": 0, "clean_acc": 0.1, "asr": 0.0, "seconds": 0.5})
        live.round_started(1, [0, 4, 7], [4])
        live.client_replied(1, 4, {"train_seconds": 41.0, "invert_seconds": 30.1, "harden_seconds": 10.9}, None)
        live.client_replied(1, 7, None, CLIENT_RAISED)
        text = _text(live)
        assert "round 1/3" in text and "2/3 clients replied, 1 failed" in text
        assert "client 4 (malicious): 41.0s (harden 10.9s, invert 30.1s)" in text and "client 7: FAILED" in text
        live.round_finished({"round": 1, "clean_acc": 0.5, "asr": 0.2, "seconds": 1.0, "sampled": [0, 4, 7],
                             "malicious": [4]})
        live.round_started(2, [0, 4, 7], [4])
        assert "eta " in _text(live)
    finally:
        live.close()
    assert "round   1 | acc 0.5000" in console.file.getvalue()


def _text(live: LiveProgress) -> str:
    console = Console(file=io.StringIO(), width=140)
    console.print(live._render())
    return console.file.getvalue()


def test_client_timings_line():
    assert client_timings(3, {"train_seconds": 2.0}, None) == "client 3: 2.0s"
    assert client_timings(3, {}, None, malicious=True) == "client 3 (malicious): done"


FLIP_STATS = {"train_seconds": 13.1, "invert_seconds": 3.8, "harden_seconds": 2.3, "flip_warmup": 1.0,
              "flip_inversion_steps": 37.0, "flip_triggers_found": 5.0, "flip_directions": 15.0, "train_loss": 0.2}


def test_flip_work_shows_in_the_client_line_and_the_round_line():
    assert client_timings(3, FLIP_STATS, None) == ("client 3: 13.1s (harden 2.3s, invert 3.8s; warm-up, "
                                                   "37 inversion steps, 5/15 triggers found)")
    later = {**FLIP_STATS, "flip_warmup": 0.0, "flip_inversion_steps": 26.0}
    assert client_timings(3, later, None).endswith(
        "(harden 2.3s, invert 3.8s; 26 inversion steps, 5/15 triggers found)")
    row = {"round": 2, "clean_acc": 0.97, "asr": 0.02, "seconds": 9.8, "sampled": [3, 4], "malicious": [4],
           **{f"client_{k}": v for k, v in later.items()}}
    assert format_round(row) == ("round   2 | acc 0.9700 | asr 0.0200 | sampled 2 (1 mal) | flip per client: invert "
                                 "3.8s, harden 2.3s, 26 inversion steps, 5/15 triggers found | 9.8s")
    assert "flip" not in format_round({**row, "client_invert_seconds": None}) and flip_work({"train_loss": 1}) == ""


GLOBAL = {"w": np.zeros(3, dtype=np.float32)}  # the global model the replies are checked against


def reply_content(value: float):
    """A TRAIN reply's content as the strategy sees it (the server loop has taken the client state out)."""
    content = fit_reply(FitResult(state={"w": torch.full((3,), value)}, num_examples=4), ClientState())
    assert take_state(content) is not None
    return content


class FakeGrid:
    """Replies arrive over several polls; partition 1 sends NaN, partition 2 fails, partition 3 never answers."""

    def __init__(self) -> None:
        self.polls = 0

    def push_messages(self, messages):
        return [f"m{m.dst}" for m in messages]

    def pull_messages(self, ids):
        self.polls += 1
        reply = {1: ("m0", 100, None), 2: ("m1", 101, None), 3: ("m2", 102, "boom")}.get(self.polls)
        if reply is None or reply[0] not in ids:
            return []
        mid, node, error = reply
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid, src_node_id=node),
                                has_error=lambda e=error: e is not None,
                                error=SimpleNamespace(reason=error),
                                content=reply_content(float("nan") if node == 101 else 1.0))]


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def phase(self, text):
        self.events.append(("phase", text))

    def round_started(self, server_round, sampled, malicious):
        self.events.append(("started", server_round, list(sampled)))

    def client_replied(self, server_round, partition, metrics, error):
        self.events.append(("replied", partition, error))

    def replies_done(self, server_round, failures):
        self.events.append(("done", dict(failures)))


def test_the_round_watch_reports_each_reply_as_it_arrives_and_the_strategys_verdict():
    record = RoundRecord(sampled=[0, 1, 2, 3], malicious=[], attacking=[], started=0.0)
    partition_of = {100: 0, 101: 1, 102: 2, 103: 3}
    observer = Recorder()
    watch = RoundWatch(observer, 1, record, partition_of)
    replies, unanswered = exchange(FakeGrid(), [SimpleNamespace(dst=d) for d in range(4)], 0.6,  # type: ignore[arg-type]
                                   threading.Event(), on_replies=watch.arrived)
    strategy = SimpleNamespace(partition_of=partition_of, global_state=GLOBAL, round_timeout=0.5)
    SeededFedAvg.screen_replies(strategy, record, replies)  # type: ignore[arg-type]  # the judge
    watch.done()
    assert len(replies) == 3 and unanswered == 1
    nan = check_fit_reply(reply_content(float("nan")), GLOBAL)  # what the strategy rejects it for
    assert nan is not None and check_fit_reply(reply_content(1.0), GLOBAL) is None
    assert observer.events == [("started", 1, [0, 1, 2, 3]), ("replied", 0, None), ("replied", 1, None),
                               ("replied", 2, "boom"), ("done", {1: nan, 2: "boom", 3: no_reply_reason(0.5)})]
    assert record.errors == [f"client 1: {nan}", "client 2: boom", f"client 3: {no_reply_reason(0.5)}"]


def test_a_start_up_killed_by_ray_for_memory_is_one_line_with_the_fix(monkeypatch):
    import pytest
    from flwr.supercore.task_identity import TaskIdentity

    from flip_fl.federation.loop import discover_partitions
    from flip_fl.federation.runtime import SimulationError

    class KilledGrid:
        def get_node_ids(self):
            return [11, 12, 13]

        def push_messages(self, messages):
            return ["q0", "q1", "q2"]

        def pull_messages(self, ids):
            reasons = [OUT_OF_MEMORY, OUT_OF_MEMORY.replace("3.46GB", "3.52GB"), CLIENT_RAISED]
            return [SimpleNamespace(has_error=lambda: True, error=SimpleNamespace(reason=r),
                                    metadata=SimpleNamespace(reply_to_message_id=f"q{i}", src_node_id=11 + i))
                    for i, r in enumerate(reasons)]

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # Flower sets these inside a real ServerApp
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    with pytest.raises(SimulationError) as err:
        discover_partitions(KilledGrid(), 3, timeout=5, stop=threading.Event())  # type: ignore[arg-type]
    message = str(err.value)
    assert message.startswith("only 0 of 3 clients answered the start-up query within 300s: 2x out of memory: Ray "
                              "killed the client's worker; 1x RuntimeError: disk on fire. Ray killed client workers")
    assert "\n" not in message and message.endswith("(Ray saw 3.46GB of 23.54GB in use)")

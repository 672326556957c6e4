"""The JMeter plans in bench/jmeter: both parse as JMeter plans with the expected samplers,
and the ingest plan runs for real (Debian's jmeter 2.13 through bench/jmeter/run-jmeter, in
non-GUI mode) against a node started here, every sample a 202."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import Node

JMETER_DIR = Path(__file__).resolve().parent.parent / "bench" / "jmeter"
INGEST = JMETER_DIR / "ingest.jmx"
WEBSOCKET = JMETER_DIR / "websocket.jmx"
LAUNCHER = JMETER_DIR / "run-jmeter"
WSS = "eu.luminis.jmeter.wssampler."


def elements(tree: ET.Element) -> Iterator[ET.Element]:
    """Every test element of a plan in document order (what hashTrees hold, but hashTrees)."""
    for child in tree:
        if child.tag != "hashTree" and tree.tag == "hashTree":
            yield child
        if child.tag == "hashTree":
            yield from elements(child)


def prop(element: ET.Element, name: str) -> str | None:
    for child in element:
        if child.get("name") == name:
            return child.text or ""
    return None


def check_shape(root: ET.Element) -> None:
    """JMeter's layout: each test element in a hashTree is followed by its own hashTree."""
    assert root.tag == "jmeterTestPlan"
    for tree in root.iter("hashTree"):
        children = list(tree)
        for i, child in enumerate(children):
            if child.tag != "hashTree":
                assert i + 1 < len(children) and children[i + 1].tag == "hashTree", (
                    f"{child.tag} {child.get('testname')!r} has no hashTree after it"
                )
            assert child.tag == "hashTree" or child.get("testclass"), child.tag


def test_ingest_plan_is_a_jmeter_2_13_plan() -> None:
    root = ET.parse(INGEST).getroot()
    check_shape(root)
    assert root.get("jmeter", "").startswith("2.13")
    found = list(elements(root))
    tags = [e.tag for e in found]
    assert tags.count("TestPlan") == 1 and tags.count("ThreadGroup") == 1
    assert "ResultCollector" not in tags  # results go to -l, no listener in the plan

    group = next(e for e in found if e.tag == "ThreadGroup")
    assert prop(group, "ThreadGroup.num_threads") == "${__P(threads,16)}"
    loop = next(e for e in group if e.get("name") == "ThreadGroup.main_controller")
    assert prop(loop, "LoopController.loops") == "${__P(loops,500)}"
    variables = {
        prop(arg, "Argument.name"): prop(arg, "Argument.value")
        for arg in root.iter("elementProp")
        if arg.get("elementType") == "Argument"
    }
    assert variables["host"] == "${__P(host,127.0.0.1)}"
    assert variables["port"] == "${__P(port,9502)}"
    assert variables["api_key"] == "${__P(api_key,)}"

    (sampler,) = [e for e in found if e.tag == "HTTPSamplerProxy"]
    assert prop(sampler, "HTTPSampler.method") == "POST"
    assert prop(sampler, "HTTPSampler.path") == "/api/v1/messages"
    assert prop(sampler, "HTTPSampler.port") == "${port}"
    assert prop(sampler, "HTTPSampler.use_keepalive") == "true"
    assert prop(sampler, "HTTPSampler.postBodyRaw") == "true"
    body = next(e for e in sampler.iter("stringProp") if e.get("name") == "Argument.value").text
    assert body is not None and "${__Random(1,${uids})}" in body
    sample = json.loads(body.replace("${__Random(1,${uids})}", "7").replace("${__time(,)}", "1"))
    assert sample["to"] == 7 and sample["kind"] == "notice" and isinstance(sample["body"], dict)

    headers = {
        prop(h, "Header.name"): prop(h, "Header.value")
        for h in root.iter("elementProp")
        if h.get("elementType") == "Header"
    }
    assert headers == {"Content-Type": "application/json", "Authorization": "Bearer ${api_key}"}
    (assertion,) = [e for e in found if e.tag == "ResponseAssertion"]
    assert prop(assertion, "Assertion.test_field") == "Assertion.response_code"
    assert [s.text for s in assertion.iter("stringProp") if s.get("name") == "49588"] == ["202"]


def test_websocket_plan_uses_the_plugin_samplers() -> None:
    root = ET.parse(WEBSOCKET).getroot()
    check_shape(root)
    found = list(elements(root))
    for element in found:
        if element.tag.startswith(WSS):  # the plugin's elements: tag = testclass, class + Gui
            assert element.get("testclass") == element.tag
            assert element.get("guiclass") == element.tag + "Gui"
    groups = [e for e in found if e.tag == "ThreadGroup"]
    assert [g.get("testname") for g in groups] == ["clients", "publishers"]

    samplers = [e for e in found if e.tag.startswith(WSS) and e.tag.endswith("Sampler")]
    assert [(e.tag.removeprefix(WSS), e.get("testname")) for e in samplers] == [
        ("OpenWebSocketSampler", "open /ws"),
        ("SingleReadWebSocketSampler", "read hello"),
        ("RequestResponseWebSocketSampler", "ping"),
        ("SingleReadWebSocketSampler", "push"),
        ("CloseWebSocketSampler", "close"),
    ]
    opened, hello, ping, push, _ = samplers
    assert prop(opened, "server") == "${host}" and prop(opened, "port") == "${port}"
    assert prop(opened, "path") == "/ws?token=${token}"
    assert prop(hello, "createNewConnection") == "false"
    assert json.loads(prop(ping, "requestData") or "") == {
        "id": "p1", "action": "ping", "data": {},
    }
    assert prop(push, "optional") == "true"

    (tokens,) = [e for e in found if e.tag == "CSVDataSet"]
    assert prop(tokens, "variableNames") == "uid,token"
    (publish,) = [e for e in found if e.tag == "HTTPSamplerProxy"]
    assert prop(publish, "HTTPSampler.path") == "/api/v1/messages"
    assert prop(publish, "HTTPSampler.port") == "${ingest_port}"


def jmeter_missing() -> str | None:
    if not Path("/usr/bin/jmeter").exists() and shutil.which("jmeter") is None:
        return "jmeter is not installed (Debian: apt-get install jmeter)"
    return None


@pytest.mark.e2e
@pytest.mark.skipif(jmeter_missing() is not None, reason=str(jmeter_missing()))
@pytest.mark.parametrize("api_key", ["", "jmeter-test-key-42"], ids=["no-key", "api-key"])
def test_ingest_plan_runs_against_a_node(
    make_node: Callable[..., Node], tmp_path: Path, api_key: str
) -> None:
    node = make_node(ingest={"api_key": api_key}).start()
    results, log = tmp_path / "results.jtl", tmp_path / "jmeter.log"
    command = [
        str(LAUNCHER), "-n", "-t", str(INGEST), "-l", str(results), "-j", str(log),
        "-Jhost=127.0.0.1", f"-Jport={node.ingest_port}", "-Jthreads=2", "-Jloops=20",
        "-Jjmeter.save.saveservice.output_format=csv",
        "-Jjmeter.save.saveservice.print_field_names=true",
    ]
    if api_key:
        command.append(f"-Japi_key={api_key}")
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=100)
    detail = f"{run.stdout}\n{run.stderr}\n{log.read_text() if log.exists() else ''}"
    assert run.returncode == 0, detail
    assert results.exists(), detail
    with results.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40, detail
    failed = [r for r in rows if r["success"] != "true" or r["responseCode"] != "202"]
    assert not failed, f"{len(failed)} failed samples, first: {failed[0]}"
    assert {r["label"] for r in rows} == {"POST /api/v1/messages"}

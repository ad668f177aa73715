"""C++, Java, JavaScript and Go in the sandbox: programs that try to cheat or harm never pass and never reach the host
(early exit 0, infinite loop, fork bomb, unbounded allocation, writing outside the work directory, network, output
flood), and a sample that returns wrong answers fails (JavaScript's console.assert included)."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval_harness.datasets import load_humaneval_x
from eval_harness.execution import execute
from eval_harness.sandbox import Limits
from tests.conftest import shared_path
from tests.isolation import require_isolation
from tests.test_sandbox import assert_not_connected, host_listener

ESCAPE = Path("/var/lib/codegeex")  # outside every work directory, owned by root


def cpp_static(code: str) -> str:
    """Close the function, then run ``code`` in a static initialiser, before main and the tests."""
    return ("return false;}\n#include <cstdlib>\n#include <cstdio>\n#include <sys/socket.h>\n#include <netinet/in.h>\n"
            "#include <arpa/inet.h>\n#include <vector>\nstatic int codegeex_cheat = [](){ " + code + " return 0; }();\n")


# JavaScript's connect is asynchronous: the program waits for its outcome on every address and prints it, the
# tests' failed assertion swallowed meanwhile (so the run is not attested, and fails)
JS_CONNECT = """for (const host of HOSTS) {
  const s = require('net').connect(PORT, host);
  const t = setTimeout(() => { console.log(`NET ${host} timeout`); s.destroy(); }, 2500);
  s.on('connect', () => { clearTimeout(t); console.log(`NET ${host} connected`); s.destroy(); });
  s.on('error', (e) => { clearTimeout(t); console.log(`NET ${host} ${e.code}`); });
}
process.on('uncaughtException', () => {});
return false
}
"""


def cheats(port: int, hosts: list[str]) -> dict[str, dict[str, str]]:
    connect_c = (f"int s = socket(AF_INET, SOCK_STREAM, 0); sockaddr_in a{{}}; a.sin_family = AF_INET; "
                 f"a.sin_port = htons({port}); a.sin_addr.s_addr = inet_addr(\"127.0.0.1\"); "
                 "connect(s, (sockaddr*)&a, sizeof a);")
    return {
        "cpp": {
            "exit0": cpp_static("std::exit(0);"),
            "loop": "while (true) {}\n}\n",
            "fork": cpp_static("while (true) std::system(\"sleep 100 &\");"),
            "memory": cpp_static("std::vector<std::vector<char>> v; while (true) v.emplace_back(1 << 24, 'x');"),
            "write": cpp_static(f"FILE* f = std::fopen(\"{ESCAPE}/escape-cpp\", \"w\"); if (f) std::fputs(\"x\", f);"),
            "network": cpp_static(connect_c),
            "flood": cpp_static("while (true) std::puts(\"flood flood flood flood\");"),
        },
        "java": {
            "exit0": "System.exit(0); return true;\n    }\n}\n",
            "loop": "while (true) {}\n    }\n}\n",
            "fork": "while (true) { try { new ProcessBuilder(\"sleep\", \"100\").start(); } catch (Exception e) {} }\n"
                    "    }\n}\n",
            "memory": "java.util.List<long[]> l = new java.util.ArrayList<>(); while (true) l.add(new long[1 << 20]);"
                      "\n    }\n}\n",
            "write": f"try {{ java.nio.file.Files.writeString(java.nio.file.Path.of(\"{ESCAPE}/escape-java\"), \"x\"); "
                     "} catch (Exception e) {} return false;\n    }\n}\n",
            "network": f"try {{ new java.net.Socket(\"127.0.0.1\", {port}); }} catch (Exception e) {{}} return false;\n"
                       "    }\n}\n",
            "flood": "while (true) System.out.println(\"flood flood flood flood\");\n    }\n}\n",
        },
        "js": {
            "exit0": "process.exit(0)\n}\n",
            "loop": "while (true) {}\n}\n",
            "fork": "const cp = require('child_process'); while (true) { try { cp.spawn('sleep', ['100']) } catch (e) {} }"
                    "\n}\n",
            "memory": "const a = []; while (true) a.push(new Array(1e6).fill(1))\n}\n",
            "write": f"try {{ require('fs').writeFileSync('{ESCAPE}/escape-js', 'x') }} catch (e) {{}} return false\n}}\n",
            "network": JS_CONNECT.replace("HOSTS", repr(hosts)).replace("PORT", str(port)),
            "flood": "while (true) console.log('flood flood flood flood')\n}\n",
        },
        "go": {
            "exit0": "os.Exit(0)\n    return true\n}\n",
            "loop": "for {\n    }\n}\n",
            "fork": "for {\n        exec.Command(\"sleep\", \"100\").Start()\n    }\n}\n",
            "memory": "var s [][]byte\n    for {\n        s = append(s, make([]byte, 1<<24))\n        s[len(s)-1][0] = 1\n"
                      "    }\n}\n",
            "write": f"os.WriteFile(\"{ESCAPE}/escape-go\", []byte(\"x\"), 0644)\n    return false\n}}\n",
            "network": f"net.Dial(\"tcp\", \"127.0.0.1:{port}\")\n    return false\n}}\n",
            "flood": "for {\n        fmt.Println(\"flood flood flood flood\")\n    }\n}\n",
        },
    }


WRONG = {"cpp": "return false;\n}\n", "java": "return false;\n    }\n}\n", "js": "return false\n}\n",
         "go": "return false\n}\n"}
EXPECTED = {"exit0": {"failed"}, "loop": {"timeout"}}


@pytest.fixture(scope="module")
def first_problems():
    data = shared_path("humaneval-x")
    return {lang: probs[0] for lang, probs in load_humaneval_x(data, ["cpp", "java", "js", "go"]).items()}


@pytest.mark.slow
@pytest.mark.parametrize("lang", ["cpp", "java", "js", "go"])
def test_cheating_and_harmful_programs_never_pass_nor_reach_the_host(first_problems, lang):
    require_isolation()
    problem = first_problems[lang]
    (ESCAPE / f"escape-{lang}").unlink(missing_ok=True)
    limits = Limits(timeout_s=4, cpu_s=6, memory_bytes=2 << 30)
    with host_listener() as (port, hosts, connections):
        rows = {name: execute(problem, code, limits) for name, code in cheats(port, hosts)[lang].items()}
    statuses = {name: row["status"] for name, row in rows.items()}
    if lang == "js":  # it really tried: an outcome for every address, none a connection
        assert_not_connected(rows["network"]["output"], hosts)
    assert all(s != "passed" for s in statuses.values()), statuses
    for name, allowed in EXPECTED.items():
        assert statuses[name] in allowed, (name, statuses)
    assert statuses["flood"] in ("sandbox_violation", "timeout"), statuses
    assert not (ESCAPE / f"escape-{lang}").exists() and not connections, statuses
    assert execute(problem, WRONG[lang], limits)["status"] == "failed"
    assert execute(problem, problem.canonical_solution, limits)["status"] == "passed"


GO_BATCH = {  # completion of Go/0 -> status, alone and in a batch alike
    "canonical": None, "wrong": "return false\n}\n", "panic": "panic(\"no\")\n}\n",
    "compile": "return 5\n}\n",
    "init_exit0": "return false\n}\nfunc init() { os.Exit(0) }\n",
    "var_exit0": "return false\n}\nvar codegeexCheat = func() int { os.Exit(0); return 0 }()\n",
}


@pytest.mark.slow
def test_go_batch_matches_single_programs_and_keeps_out_code_that_runs_before_main(first_problems):
    """Go programs are linked into one binary per batch (eval_harness.gobatch); a sample whose top level could run
    code before main (init, package variables) would run inside every other sample's process, so it must stay out
    of the batch: here, if either cheat joined, the canonical solutions beside it would stop passing."""
    from eval_harness.executor import execute_jobs, make_jobs
    from eval_harness.gobatch import batchable

    go = load_humaneval_x(shared_path("humaneval-x"), ["go"])["go"]
    problems = {p.task_id: p for p in go[:4]}
    samples = [{"task_id": p.task_id, "completion": p.canonical_solution, "kind": "generation", "key": p.task_id}
               for p in go[1:4]]
    samples += [{"task_id": "Go/0", "completion": c or go[0].canonical_solution, "kind": "generation", "key": name}
                for name, c in GO_BATCH.items()]
    jobs = make_jobs(samples, problems)
    assert [batchable(j.program.unit) for j in jobs] == [True] * 7 + [False, False]
    rows: list[dict] = []
    execute_jobs(jobs, Limits(timeout_s=10), 2, rows.append)
    batched = {r["key"]: r["status"] for r in rows}
    expected = {"canonical": "passed", "wrong": "failed", "panic": "failed", "compile": "compile_error",
                "init_exit0": "failed", "var_exit0": "failed"}
    assert batched == {**dict.fromkeys(["Go/1", "Go/2", "Go/3"], "passed"), **expected}, batched
    alone = {name: execute(go[0], c or go[0].canonical_solution)["status"] for name, c in GO_BATCH.items()}
    assert alone == expected, alone


@pytest.mark.slow
def test_java_batch_blames_every_broken_file_however_many_errors():
    """A batch where most samples are garbage (hundreds of javac errors, far past javac's default 100 and the
    captured output): each broken sample is a compile_error, never a missing class at run time, and the good ones
    beside them pass."""
    from eval_harness.executor import execute_jobs, make_jobs

    java = load_humaneval_x(shared_path("humaneval-x"), ["java"])["java"][:3]
    problems = {p.task_id: p for p in java}
    garbage = " the    ,is(d} an @ None, *\n#_def (!\n is theward the build theKE is  * None the be make\n *From( .2}\n"
    samples = [{"task_id": p.task_id, "completion": p.canonical_solution, "kind": "generation", "key": f"ok{i}"}
               for i, p in enumerate(java)]
    samples += [{"task_id": java[i % 3].task_id, "completion": garbage * (1 + i % 4) + f"// {i}\n", "kind": "generation",
                 "key": f"bad{i}"} for i in range(30)]
    rows: list[dict] = []
    execute_jobs(make_jobs(samples, problems), Limits(), 2, rows.append)
    status = {r["key"]: r["status"] for r in rows}
    assert [status[f"ok{i}"] for i in range(3)] == ["passed"] * 3
    assert {status[f"bad{i}"] for i in range(30)} == {"compile_error"}, status
    assert all("src/cg" in r["output"] and "error" in r["output"] for r in rows if r["key"].startswith("bad"))


@pytest.mark.slow
def test_a_java_batch_member_cannot_run_another_members_tests():
    """Member 1 loads member 0's runner (same batch, same class path layout) to have its tests run and attested:
    each member's run sees only its own package, so the class is not there."""
    from eval_harness.executor import execute_jobs, make_jobs

    require_isolation()
    java = load_humaneval_x(shared_path("humaneval-x"), ["java"])["java"][0]
    cheat = ("try { var m = Class.forName(\"cg0.CodegeexRunner\").getMethod(\"main\", String[].class); "
             "m.setAccessible(true); m.invoke(null, (Object) new String[0]); System.exit(0); } catch (Exception e) {} "
             "return false;\n    }\n}\n")
    samples = [{"task_id": java.task_id, "completion": c, "kind": "generation", "key": k}
               for k, c in (("canonical", java.canonical_solution), ("cheat", cheat))]
    rows: list[dict] = []
    execute_jobs(make_jobs(samples, {java.task_id: java}), Limits(), 2, rows.append)
    assert {r["key"]: r["status"] for r in rows} == {"canonical": "passed", "cheat": "failed"}, rows

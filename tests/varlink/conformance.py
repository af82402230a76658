#!/usr/bin/env python3
"""Checks b2p-agent's varlink service with the python `varlink` client.

Usage: conformance.py ADDRESS IMAGE
ADDRESS is a varlink address (unix:PATH); IMAGE a local image that has
busybox's echo (the tests use localhost/busybox:latest).
Prints one line per check and a closing "N passed, M failed" line; exits
non-zero when a check fails.
"""
import sys
import threading

import varlink

ADDRESS, IMAGE = sys.argv[1], sys.argv[2]
results = []


def check(name):
    def wrap(fn):
        try:
            fn()
            results.append((name, None))
            print(f"ok   {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            results.append((name, e))
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        return fn
    return wrap


def client():
    return varlink.Client(address=ADDRESS)


def expect_error(fn, name):
    try:
        fn()
    except varlink.VarlinkError as e:
        assert e.error() == name, f"got {e.error()} {e.parameters()}"
        return e.parameters()
    raise AssertionError(f"no {name} error")


@check("GetInfo lists the three interfaces")
def _():
    with client() as c, c.open("org.varlink.service") as s:
        info = s.GetInfo()
        for key in ("vendor", "product", "version", "url"):
            assert isinstance(info[key], str) and info[key], key
        assert set(info["interfaces"]) >= {"org.varlink.service", "io.podman", "io.b2p.Machine"}, info
        # This project's own name, not another project's address.
        assert info["url"].startswith("b2p ") and "boot2podman/boot2podman" not in info["url"], info


@check("GetInterfaceDescription parses for each interface")
def _():
    with client() as c, c.open("org.varlink.service") as s:
        for name in ("org.varlink.service", "io.podman", "io.b2p.Machine"):
            text = s.GetInterfaceDescription(name)["description"]
            iface = varlink.Interface(text)
            assert iface.name == name, iface.name
        podman = varlink.Interface(s.GetInterfaceDescription("io.podman")["description"])
        for m in ("GetVersion", "GetInfo", "ListContainers", "GetContainer", "CreateContainer",
                  "InspectContainer", "StartContainer", "StopContainer", "RemoveContainer",
                  "GetContainerLogs", "WaitContainer", "ListImages", "ImageExists", "PullImage",
                  "RemoveImage", "ContainerExists", "Ps", "GetContainersByStatus",
                  "ListContainerMounts"):
            assert isinstance(podman.members.get(m), varlink.scanner._Method), m
        for e in ("ContainerNotFound", "ImageNotFound", "ErrorOccurred", "RuntimeError"):
            assert isinstance(podman.members.get(e), varlink.scanner._Error), e
        expect_error(lambda: s.GetInterfaceDescription("io.nowhere"),
                     "org.varlink.service.InterfaceNotFound")


@check("GetVersion has all six fields")
def _():
    with client() as c, c.open("io.podman") as p:
        v = p.GetVersion()
        for key in ("version", "go_version", "git_commit", "built", "os_arch"):
            assert isinstance(v[key], str), key
        assert v["version"] and v["os_arch"].startswith("linux/"), v
        assert v["remote_api_version"] == 1, v


@check("GetInfo (io.podman) has host, store, registries, podman")
def _():
    with client() as c, c.open("io.podman") as p:
        info = p.GetInfo()["info"]
        assert info["host"]["os"] == "linux" and info["host"]["cpus"] >= 1, info["host"]
        assert info["store"]["graph_root"], info["store"]
        assert info["podman"]["podman_version"], info["podman"]


@check("ListImages shows busybox; ImageExists")
def _():
    with client() as c, c.open("io.podman") as p:
        tags = [t for i in p.ListImages()["images"] for t in i["repoTags"]]
        assert any("busybox" in t for t in tags), tags
        assert p.ImageExists(IMAGE)["exists"] == 0
        assert p.ImageExists("localhost/no-such-image:1")["exists"] == 1


@check("Create + Start + Wait + GetContainerLogs of echo hello; RemoveContainer")
def _():
    with client() as c, c.open("io.podman") as p:
        cid = p.CreateContainer({"args": [IMAGE, "echo", "hello"]})["container"]
        assert len(cid) == 64, cid
        listed = p.GetContainer(cid[:12])["container"]
        assert listed["id"] == cid and listed["command"] == ["echo", "hello"], listed
        assert p.StartContainer(cid)["container"] == cid
        assert p.WaitContainer(cid, 100)["exitcode"] == 0
        assert p.GetContainerLogs(cid)["container"] == ["hello"]
        inspect = p.InspectContainer(cid)["container"]
        assert '"ExitCode": 0' in inspect or '"ExitCode":0' in inspect, inspect[:200]
        assert cid in [x["id"] for x in p.ListContainers()["containers"]]
        assert p.RemoveContainer(cid, False, False)["container"] == cid
        assert cid not in [x["id"] for x in p.ListContainers()["containers"]]


@check("a failing command's exit code and stderr")
def _():
    with client() as c, c.open("io.podman") as p:
        cid = p.CreateContainer({"args": [IMAGE, "sh", "-c", "echo oops >&2; exit 3"],
                                 "name": "b2p-conformance-exit3", "env": ["A=1"]})["container"]
        p.StartContainer("b2p-conformance-exit3")
        assert p.WaitContainer(cid, 0)["exitcode"] == 3
        assert p.GetContainerLogs(cid)["container"] == ["oops"]
        p.RemoveContainer(cid, True, True)


@check("StopContainer stops a running container")
def _():
    with client() as c, c.open("io.podman") as p:
        cid = p.CreateContainer({"args": [IMAGE, "sleep", "600"], "stopTimeout": 1})["container"]
        p.StartContainer(cid)
        assert p.GetContainer(cid)["container"]["containerrunning"] is True
        assert p.StopContainer(cid, 1)["container"] == cid
        got = p.GetContainer(cid)["container"]
        assert got["containerrunning"] is False, got["status"]
        p.RemoveContainer(cid, True, False)


@check("unknown container -> io.podman.ContainerNotFound")
def _():
    with client() as c, c.open("io.podman") as p:
        for call in (lambda: p.GetContainer("b2p-no-such-container"),
                     lambda: p.StartContainer("b2p-no-such-container"),
                     lambda: p.GetContainerLogs("b2p-no-such-container"),
                     lambda: p.RemoveContainer("b2p-no-such-container", True, False)):
            params = expect_error(call, "io.podman.ContainerNotFound")
            assert params["id"] == "b2p-no-such-container" and params["reason"], params


@check("unknown image -> io.podman.ImageNotFound")
def _():
    with client() as c, c.open("io.podman") as p:
        expect_error(lambda: p.RemoveImage("localhost/no-such-image:1", False),
                     "io.podman.ImageNotFound")


@check("bad parameters -> org.varlink.service.InvalidParameter naming them")
def _():
    # Raw calls: the python client would refuse some of these itself.
    with client() as c:
        conn = c.open_connection()
        try:
            def raw(method, params):
                import json
                conn.sendall(json.dumps({"method": method, "parameters": params}).encode() + b"\0")
                buf = b""
                while not buf.endswith(b"\0"):
                    chunk = conn.recv(65536)
                    assert chunk, "connection closed"
                    buf += chunk
                return json.loads(buf[:-1])
            r = raw("io.podman.StopContainer", {"name": "x", "timeout": "3"})
            assert r["error"] == "org.varlink.service.InvalidParameter", r
            assert r["parameters"]["parameter"] == "timeout", r
            r = raw("io.podman.StopContainer", {"name": "x", "signal": 9})
            assert r["parameters"]["parameter"] == "signal", r
            r = raw("io.podman.Ps", {"opts": {"all": True, "filters": ["nokey"]}})
            assert r["parameters"]["parameter"] == "opts.filters[0]", r
            r = raw("io.podman.Ps", {"opts": {"all": "yes"}})
            assert r["parameters"]["parameter"] == "opts.all", r
            r = raw("io.podman.GetContainer", {"id": 42})
            assert r == {"error": "org.varlink.service.InvalidParameter",
                         "parameters": {"parameter": "id"}}, r
            r = raw("io.podman.CreateContainer", {"create": {"args": [IMAGE], "cidfile": "/x"}})
            assert r["parameters"]["parameter"] == "create.cidfile", r
            r = raw("io.podman.NoSuchMethod", {})
            assert r["error"] == "org.varlink.service.MethodNotFound", r
            r = raw("io.nowhere.Method", {})
            assert r["error"] == "org.varlink.service.InterfaceNotFound", r
        finally:
            conn.close()


def raw_call(method, params):
    """One call on a fresh connection, bypassing the python client's own
    argument checks (it refuses calls with missing arguments)."""
    import json
    with client() as c:
        conn = c.open_connection()
        try:
            conn.sendall(json.dumps({"method": method, "parameters": params}).encode() + b"\0")
            buf = b""
            while not buf.endswith(b"\0"):
                chunk = conn.recv(65536)
                assert chunk, "connection closed"
                buf += chunk
            return json.loads(buf[:-1])
        finally:
            conn.close()


def ok(reply):
    assert "error" not in reply, reply
    return reply["parameters"]


@check("missing parameters take Podman 1.9.3's zero values")
def _():
    with client() as c, c.open("io.podman") as p:
        cid = p.CreateContainer({"args": [IMAGE, "sleep", "600"]})["container"]
        p.StartContainer(cid)
        # timeout 0: stopped at once (sleep ignores nothing, but 0 means no grace).
        assert ok(raw_call("io.podman.StopContainer", {"name": cid}))["container"] == cid
        assert p.GetContainer(cid)["container"]["containerrunning"] is False
        assert ok(raw_call("io.podman.WaitContainer", {"name": cid}))["exitcode"] != 0
        assert ok(raw_call("io.podman.RemoveContainer", {"name": cid}))["container"] == cid
        assert cid not in [x["id"] for x in p.ListContainers()["containers"]]
        # force false by default: still an ImageNotFound, not InvalidParameter.
        r = raw_call("io.podman.RemoveImage", {"name": "localhost/no-such-image:1"})
        assert r["error"] == "io.podman.ImageNotFound", r
        # A missing name is the empty name: not found, as 1.9.3 answered.
        r = raw_call("io.podman.StartContainer", {})
        assert r["error"] == "io.podman.ContainerNotFound", r
        assert ok(raw_call("io.podman.ImageExists", {}))["exists"] == 1


@check("CreateContainer of a missing image -> io.podman.ImageNotFound")
def _():
    with client() as c, c.open("io.podman") as p:
        params = expect_error(
            lambda: p.CreateContainer({"args": ["localhost/b2p-no-such-image:1", "true"]}),
            "io.podman.ImageNotFound")
        assert params["id"] == "localhost/b2p-no-such-image:1" and params["reason"], params
        params = expect_error(
            lambda: p.CreateContainer({"args": ["localhost/b2p-no-such-image:1", "true"],
                                       "pull": "never"}),
            "io.podman.ImageNotFound")
        assert params["id"] == "localhost/b2p-no-such-image:1", params


@check("ContainerExists, Ps, GetContainersByStatus, ListContainerMounts")
def _():
    with client() as c, c.open("io.podman") as p:
        done = p.CreateContainer({"args": [IMAGE, "sh", "-c", "exit 4"],
                                  "name": "b2p-conformance-done", "label": ["b2p=ps"]})["container"]
        p.StartContainer(done)
        assert p.WaitContainer(done, 100)["exitcode"] == 4
        up = p.CreateContainer({"args": [IMAGE, "sleep", "600"],
                                "name": "b2p-conformance-up"})["container"]
        p.StartContainer(up)
        try:
            assert p.ContainerExists("b2p-conformance-done")["exists"] == 0
            assert p.ContainerExists(done[:12])["exists"] == 0
            assert p.ContainerExists("b2p-no-such-container")["exists"] == 1

            running = p.Ps({"all": False})["containers"]
            assert [x["names"] for x in running if x["id"] in (done[:12], up[:12])] \
                == ["b2p-conformance-up"], running
            line = next(x for x in running if x["names"] == "b2p-conformance-up")
            assert line["id"] == up[:12] and line["state"] == "running", line
            assert line["status"].startswith("Up ") and line["command"] == "sleep 600", line
            assert line["pidNum"] > 0 and line["createdAt"].startswith("20"), line
            every = p.Ps({"all": True, "noTrunc": True})["containers"]
            ended = next(x for x in every if x["id"] == done)
            assert ended["state"] == "exited" and ended["status"].startswith("Exited (4) "), ended
            assert ended["labels"].get("b2p") == "ps", ended  # and the image's own
            named = p.Ps({"all": True, "filters": ["name=b2p-conformance-done"]})["containers"]
            assert [x["id"] for x in named] == [done[:12]], named
            latest = p.Ps({"all": False, "latest": True, "noTrunc": True})["containers"]
            assert [x["id"] for x in latest] == [up], latest
            quiet = p.Ps({"all": True, "quiet": True, "filters": ["label=b2p=ps"]})["containers"]
            assert [(x["id"], x["image"]) for x in quiet] == [(done[:12], "")], quiet

            exited = [x["id"] for x in p.GetContainersByStatus(["exited"])["containerS"]]
            assert done in exited and up not in exited, exited
            both = [x["id"] for x in p.GetContainersByStatus(["exited", "running"])["containerS"]]
            assert done in both and up in both, both
            expect_error(lambda: p.GetContainersByStatus(["sleeping"]), "io.podman.ErrorOccurred")

            mounts = p.ListContainerMounts()["mounts"]
            assert isinstance(mounts, dict), mounts
            assert all(isinstance(v, str) and v for v in mounts.values()), mounts
        finally:
            p.RemoveContainer(up, True, False)
            p.RemoveContainer(done, True, False)


@check("PullImage streams more replies or fails with ErrorOccurred (no registry)")
def _():
    with client() as c, c.open("io.podman") as p:
        try:
            replies = list(p.PullImage(IMAGE, {"username": "", "password": ""}, _more=True))
            assert replies and replies[-1]["reply"]["id"], replies
        except varlink.VarlinkError as e:
            # Without a reachable registry the pull fails, cleanly.
            assert e.error() == "io.podman.ErrorOccurred", e.error()


@check("io.b2p.Machine.GetStatus")
def _():
    with client() as c, c.open("io.b2p.Machine") as m:
        st = m.GetStatus()["status"]
        assert st["uptime"] > 0 and st["kernel"], st
        assert st["podman_ready"] is True, st
        names = [x["name"] for x in st["milestones"]]
        assert "agent-listening" in names, names
        assert st["data_disk"]["state"] in ("mounted", "absent"), st["data_disk"]


@check("50 concurrent clients all get correct answers")
def _():
    errors = []
    version = None
    with client() as c, c.open("io.podman") as p:
        version = p.GetVersion()

    def worker(i):
        try:
            with client() as c, c.open("io.podman") as p, \
                    c.open("org.varlink.service") as s:
                for _ in range(4):
                    assert p.GetVersion() == version
                    assert "io.podman" in s.GetInfo()["interfaces"]
                assert p.ImageExists(IMAGE)["exists"] == 0
                expect_error(lambda: p.GetContainer(f"b2p-missing-{i}"),
                             "io.podman.ContainerNotFound")
        except Exception as e:  # noqa: BLE001
            errors.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "clients hung"
    assert not errors, errors[:5]


failed = [n for n, e in results if e is not None]
print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)

#!/usr/bin/env python3
"""vmm exporter with N probe guests counting (BENCHMARKS.md, "A fleet").

For each N: N guests in a scraped directory and N in an unscraped one (the
side-by-side control), one `vmm exporter` on the first. Measures scrape
latency (p50/p99 of back-to-back scrapes), the exporter's CPU time and
peak RSS per scrape, and each group's guest cycle rate over the same
window while the exporter is scraped once a second. Both groups are read
the same way (GET /vpmu at the window's ends) and each guest's rate runs
between the times its views were taken (the answer's time less `age_ms`),
so an old view (a read that did not wait for a fresh one) biases neither
group. Per group it also gives the VMMs' CPU time outside their vCPU
threads (API threads, the main loop), per VM and second.

Where each process runs matters on a host whose cores the guests
oversubscribe: Linux shares CPU fairly between task groups first (cgroups,
or sessions where autogroup is on), then between the tasks in a group. By
default the guests run in a session of their own, the exporter in another
and this script (the scraper) in its own, as a service manager would run
VMs, the exporter and Prometheus as separate services; `--one-group` runs
them all in this script's session, where a woken exporter or scraper
competes with every busy vCPU thread.
`--no-control` starts only the N scraped guests and measures latency
alone (the control group doubles the busy vCPU threads).
Usage: scripts/bench-fleet.py [--one-group] [--no-control] [N ...]   (default 1 8 32; the vmm of $VMM, else target/release/vmm)
"""
import json, os, signal, socket, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMM = os.environ.get("VMM", os.path.join(ROOT, "target/release/vmm"))

def api(sock):
    s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sock)
    s.sendall(b"GET /vpmu HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(65536): data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])

def cycles(sock):
    return sum(t["count"] for t in api(sock)["totals"] if t["event"] == "cycles")

def reading(sock):
    """The VM's cycles and when its (one) vCPU's view was taken: a fresh
    view (under 100 ms old). A read kicks a stale vCPU but answers with the
    old view if the vCPU thread got no CPU within 50 ms; two such reads of
    one view would make a rate of nothing over no time."""
    for _ in range(200):
        doc = api(sock)
        age = max(v["age_ms"] for v in doc["vcpus"])
        if age < 100:
            break
    at = time.time() - age / 1e3
    return sum(t["count"] for t in doc["totals"] if t["event"] == "cycles"), at

def ticks(pids):
    """CPU ticks of the VMMs' vCPU threads, and of their other threads."""
    n = [0, 0]
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                stat = open(f"/proc/{pid}/task/{task}/stat").read()
            except OSError:
                continue
            comm = stat.split("(", 1)[1].rsplit(")", 1)[0]
            f = stat.rsplit(")", 1)[1].split()
            n[not comm.startswith("vcpu")] += int(f[11]) + int(f[12])
    return n

# Starts the guests given as JSON argv lists, in the session it runs in,
# prints their pids, and ends them when it is sent SIGTERM.
LAUNCHER = """
import json, signal, subprocess, sys
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
guests = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
          for a in json.loads(sys.argv[1])]
print(" ".join(str(g.pid) for g in guests), flush=True)
signal.sigwait([signal.SIGTERM])
for g in guests: g.kill()
for g in guests: g.wait()
"""

def start_guests(groups, own_session):
    """Starts the guests of every (dir, n, tag) group through one launcher,
    in a session of its own if `own_session`; their pids per group."""
    argv = [[VMM, "--vpmu", "on", "--serial", "none", "--timeout", "600",
             "--cmdline", "probe.tests=cycles probe.cycles_ms=590000",
             "--api-socket", f"{d}/{tag}{i}.sock"] for d, n, tag in groups for i in range(n)]
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, json.dumps(argv)],
                                stdout=subprocess.PIPE, start_new_session=own_session)
    pids = [int(p) for p in launcher.stdout.readline().split()]
    for d, n, tag in groups:
        for i in range(n):
            for _ in range(400):
                try:
                    if cycles(f"{d}/{tag}{i}.sock") > 0: break
                except Exception: pass
                time.sleep(0.05)
    per_group, at = [], 0
    for _, n, _ in groups:
        per_group.append(pids[at:at + n]); at += n
    return launcher, per_group

def cpu_ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])

def hwm(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmHWM"): return int(l.split()[1])

def rates(socks, pids, secs, during=None):
    """Mean cycles/s per guest; vCPU and other CPU ms per VM per second."""
    a = [reading(s) for s in socks]; t = time.time(); k0 = ticks(pids)
    end = t + secs
    while time.time() < end:
        if during: during()
        time.sleep(max(0, min(1, end - time.time())))
    k1 = ticks(pids); dt = time.time() - t
    b = [reading(s) for s in socks]
    per = [(y[0] - x[0]) / (y[1] - x[1]) for x, y in zip(a, b)]
    ms = lambda i: (k1[i] - k0[i]) / os.sysconf("SC_CLK_TCK") * 1e3 / len(pids) / dt
    return sum(per) / len(per), ms(1), ms(0)

def run(n, own_sessions, control_group):
    with tempfile.TemporaryDirectory() as scraped, tempfile.TemporaryDirectory() as control:
        groups = [(scraped, n, "s")] + ([(control, n, "c")] if control_group else [])
        launcher, pids = start_guests(groups, own_sessions)
        sp, cp = pids[0], pids[1] if control_group else []
        port = 19000 + n
        exp = subprocess.Popen([VMM, "exporter", "--sockets", scraped, "--listen", f"127.0.0.1:{port}",
                                "--scrape-timeout", "2000", "--vm-timeout", "1000"],
                               stderr=subprocess.DEVNULL, start_new_session=own_sessions)
        try:
            time.sleep(0.5)
            url = f"http://127.0.0.1:{port}/metrics"
            scrape = lambda: urllib.request.urlopen(url, timeout=10).read()
            scrape()
            ticks0 = cpu_ticks(exp.pid); lat = []
            for _ in range(100):
                t = time.perf_counter(); body = scrape(); lat.append(time.perf_counter() - t)
            ticks = cpu_ticks(exp.pid) - ticks0
            lat.sort()
            layout = "own sessions" if own_sessions else "one group"
            head = (f"N={n} ({layout}): scrape p50 {lat[49]*1e3:.1f} ms p99 {lat[98]*1e3:.1f} ms; "
                    f"exporter CPU {ticks / os.sysconf('SC_CLK_TCK') / 100 * 1e3:.1f} ms/scrape, "
                    f"peak RSS {hwm(exp.pid)/1024:.1f} MiB, answer {len(body)/1024:.0f} KiB")
            if not control_group:
                print(f"{head}; no control guests", flush=True)
                return
            ss = [f"{scraped}/s{i}.sock" for i in range(n)]
            cs = [f"{control}/c{i}.sock" for i in range(n)]
            # Side by side over the same 20 s: the scraped group (once a second) and the control.
            import threading
            res = {}
            load = open("/proc/loadavg").read().split()[0]
            th = threading.Thread(target=lambda: res.update(c=rates(cs, cp, 20)))
            th.start(); res["s"] = rates(ss, sp, 20, during=scrape); th.join()
            print(f"{head}; guest cycles/s scraped {res['s'][0]/1e6:.1f} M, "
                  f"unscraped {res['c'][0]/1e6:.1f} M ({(res['s'][0]/res['c'][0]-1)*100:+.1f}%); "
                  f"per VM and second, vCPU thread CPU scraped {res['s'][2]:.0f} ms, unscraped {res['c'][2]:.0f} ms, "
                  f"other threads' CPU scraped {res['s'][1]:.2f} ms, unscraped {res['c'][1]:.2f} ms; "
                  f"load {load} at the window's start", flush=True)
        finally:
            exp.kill(); exp.wait()
            launcher.send_signal(signal.SIGTERM); launcher.wait()

args = sys.argv[1:]
flags = {"--one-group", "--no-control"}
for n in [int(a) for a in args if a not in flags] or [1, 8, 32]:
    run(n, "--one-group" not in args, "--no-control" not in args)

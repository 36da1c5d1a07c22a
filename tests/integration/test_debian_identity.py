"""Integration: clones of a real Debian 12 guest are unique and own their per-VM state.

Real libvirt + QEMU, the Debian guest from scripts/build-debian-guest.sh
(systemd, Debian's qemu-guest-agent, openssh-server, systemd-networkd DHCP),
read through its own guest agent. Running and frozen sources, BIOS and UEFI
(OVMF booting systemd-boot from the disk), the cloud and the generic kernel.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest

from instaclone.hv import LibvirtHypervisor as Hypervisor
from tests.support.guests import debianguest as dg
from tests.support.host import libvirt_ready
from tests.support.vmlib import Api

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(libvirt_ready() is not None, reason=str(libvirt_ready())),
    pytest.mark.skipif(dg.debian_ready() is not None, reason=str(dg.debian_ready())),
]

#: Read in the source and in each clone, one "key=value" line each.
PROBE = r"""
echo "machine_id=$(cat /etc/machine-id)"
echo "dbus_machine_id=$(cat /var/lib/dbus/machine-id 2>/dev/null)"
echo "boot_id=$(cat /proc/sys/kernel/random/boot_id)"
echo "hostname=$(hostname)"
echo "fqdn=$(hostname -f 2>&1)"
echo "client_id=$(cat /run/systemd/netif/leases/* 2>/dev/null | sed -n 's/^CLIENTID=//p' | head -1)"
echo "ipv4=$(ip -4 -o addr show scope global | awk '{print $4}' | sort | tr '\n' ' ')"
echo "ssh_fp=$(for f in /etc/ssh/ssh_host_*_key.pub; do ssh-keygen -lf "$f" | awk '{print $2}'; done | sort | tr '\n' ' ')"
echo "ssh_served=$(ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null | ssh-keygen -lf - 2>/dev/null | awk '{print $2}')"
echo "random_seed=$(sha256sum /var/lib/systemd/random-seed | cut -c1-16)"
echo "system=$(systemctl is-system-running)"
echo "failed=$(systemctl --failed --no-legend --plain | awk '{print $1}' | tr '\n' ' ')"
echo "journal=$(journalctl -n 1 --no-pager -q >/dev/null 2>&1 && ls -d /var/log/journal/$(cat /etc/machine-id) /run/log/journal/$(cat /etc/machine-id) 2>/dev/null | head -1)"
echo "kernel_errors=$(dmesg --level=emerg,alert,crit,err 2>/dev/null | sed 's/^\[[^]]*\] //' | sort -u | md5sum | cut -c1-12)"
echo "time=$(date +%s)"
"""  # noqa: E501 - a shell script; its pipelines read best whole


#: What the guest kernel's vmgenid driver logs when the VM generation ID changes.
FORKS = "dmesg | grep -c 'crng reseeded due to virtual machine fork'"


async def probe(virt: Hypervisor, name: str) -> dict[str, str]:
    rc, out = await dg.gexec(virt, name, PROBE, timeout_s=60)
    assert rc == 0, out
    return dict(line.split("=", 1) for line in out.strip().splitlines() if "=" in line)


async def clone(config: Any, body: dict[str, Any]) -> dict[str, Any]:
    async with Api(config.daemon.socket) as api:
        status, resp = await api.call("POST", "/v1/jobs?wait=600", body)
    assert status == 201, resp
    job = resp["job"]
    assert job["state"] == "Unstunned", job.get("error")
    return job


def check_unique(src: dict[str, str], clones: dict[str, dict[str, str]], job: dict[str, Any]) -> None:
    """Every point of the issue, in each clone against the source and its siblings."""
    results = {c["name"]: c for c in job["result"]["clones"]}
    for name, p in clones.items():
        ident = results[name]["identity"]
        reset = ident["reset"]
        assert p["machine_id"] == ident["machine_id"] != src["machine_id"]
        if p["dbus_machine_id"]:
            assert p["dbus_machine_id"] == p["machine_id"]
        assert p["boot_id"] == src["boot_id"]  # the same boot, continued
        assert p["hostname"] == name and p["fqdn"].split(".")[0] == name, p["fqdn"]
        assert p["client_id"] and p["client_id"] != src["client_id"], (p["client_id"], src["client_id"])
        assert p["ipv4"].strip(), "no IPv4 in the clone"
        reported = [a for i in ident["interfaces"] for a in i["ipv4"]]
        assert sorted(reported) == sorted(p["ipv4"].split()), (reported, p["ipv4"])
        assert set(p["ssh_fp"].split()).isdisjoint(src["ssh_fp"].split())
        assert sorted(f.split()[1] for f in ident["ssh_host_key_fingerprints"]) == sorted(p["ssh_fp"].split())
        assert p["ssh_served"] in p["ssh_fp"].split()  # sshd serves the new key
        assert p["random_seed"] != src["random_seed"]
        assert p["system"] == "running" and not p["failed"].strip(), (p["system"], p["failed"])
        assert p["journal"], "journald does not write under the new machine-id"
        assert p["kernel_errors"] == src["kernel_errors"], "new kernel errors in the clone"
        assert abs(int(p["time"]) - time.time()) < 15
        assert reset["kernel_rng"]["status"] == "reset", reset["kernel_rng"]
        assert reset["random_seed"]["status"] == "reset"
        assert reset["ssh_host_keys"]["status"] == "reset"
        assert reset["hosts"]["status"] == "reset" and reset["dhcp"]["status"] == "reset"
        assert ident["ipv4_waited_for"] == ["eth0"]
    a, b = clones.values()
    for key in ("machine_id", "client_id", "ssh_fp", "random_seed"):
        assert a[key] != b[key], key


def print_table(src_name: str, src: dict[str, str], src_nvram: Path | None, clones: dict[str, dict[str, str]],
                job: dict[str, Any]) -> None:
    """The identity items of the source and its clones, as a Markdown table (pytest -s shows it)."""
    nvram = {c["name"]: c.get("nvram") for c in job["result"]["clones"]}
    cols = [(src_name, src, str(src_nvram) if src_nvram else "-")] + [
        (n, p, nvram[n] or "-") for n, p in clones.items()]
    rows = [("machine-id", "machine_id"), ("DHCP client id", "client_id"), ("SSH fingerprints", "ssh_fp"),
            ("hostname -f", "fqdn"), ("IPv4", "ipv4"), ("boot id", "boot_id"), ("random-seed sha256", "random_seed")]
    print("\n| item | " + " | ".join(c[0] for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for label, key in rows:
        print(f"| {label} | " + " | ".join(f"`{c[1][key].strip()}`" for c in cols) + " |")
    print("| NVRAM | " + " | ".join(f"`{c[2]}`" for c in cols) + " |")
    for c in job["result"]["clones"]:
        print(c["name"], "phases ms:", c["identity"]["phases_ms"], "job ms:", job["durations_ms"])


async def test_running_bios_source_clones_are_unique(world):
    scratch, virt, _daemon, config = world
    src = await dg.boot(virt, scratch, "db-bios")
    before = await probe(virt, src.name)
    assert before["client_id"] and before["ssh_fp"].strip() and before["ipv4"].strip()
    job = await clone(config, {"source": src.name, "name": "db-bc", "count": 2,
                               "script": "echo post-clone $IC_CLONE_NAME > /run/post-clone; cat /run/post-clone\n"})
    clones = {c["name"]: await probe(virt, c["name"]) for c in job["result"]["clones"]}
    check_unique(before, clones, job)
    print_table(src.name, before, None, clones, job)
    for c in job["result"]["clones"]:
        assert c["identity"]["script"]["output_tail"].strip() == f"post-clone {c['name']}"
        assert c["identity"]["reset"]["vm_generation_id"]["status"] == "unsupported"  # cloud kernel
    # The source's identity is untouched.
    after = await probe(virt, src.name)
    for key in ("machine_id", "hostname", "client_id", "ssh_fp", "boot_id"):
        assert after[key] == before[key], key


async def test_frozen_uefi_source_nvram_is_copied_never_shared_or_deleted(world):
    scratch, virt, _daemon, config = world
    src = await dg.boot(virt, scratch, "db-uefi", firmware="uefi")
    assert src.nvram is not None and src.nvram.exists()
    before = await probe(virt, src.name)
    async with Api(config.daemon.socket) as api:
        status, body = await api.call("POST", f"/v1/sources/{src.name}/freeze")
        assert status == 200, body
    at_freeze = hashlib.sha256(src.nvram.read_bytes()).hexdigest()
    job = await clone(config, {"source": src.name, "name": "db-uc", "count": 2})
    assert job["result"]["frozen_source"] is True
    clones = {}
    for c in job["result"]["clones"]:
        own = Path(c["nvram"])
        assert own != src.nvram and own.parent == config.clones_dir / c["name"]
        assert hashlib.sha256(own.read_bytes()).hexdigest() == at_freeze
        assert (await virt.lookup(c["name"])).xml.count(str(src.nvram)) == 0
        clones[c["name"]] = await probe(virt, c["name"])
    check_unique(before, clones, job)
    print_table(src.name, before, src.nvram, clones, job)
    # A variable written in a clone lands in the clone's own file only.
    name = job["result"]["clones"][0]["name"]
    rc, out = await dg.gexec(virt, name, "mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null; "
                                         "printf '\\007\\000\\000\\000clone' > /sys/firmware/efi/efivars/"
                                         "IcTest-6b2d7a3c-9c8f-4e5a-a0e1-3f1f6a1e2b11 && sync")
    assert rc == 0, out
    assert hashlib.sha256(src.nvram.read_bytes()).hexdigest() == at_freeze
    async with Api(config.daemon.socket) as api:
        for c in job["result"]["clones"]:
            status, body = await api.call("DELETE", f"/v1/clones/{c['name']}")
            assert status == 200, body
            assert not Path(c["nvram"]).exists()
        # Destroying the clones left the source's NVRAM as it was.
        assert hashlib.sha256(src.nvram.read_bytes()).hexdigest() == at_freeze
        time.sleep(2)  # the frozen source's clock stands still meanwhile
        status, body = await api.call("POST", f"/v1/sources/{src.name}/unfreeze")
        assert status == 200, body
        assert body["unfrozen"]["clock"] == {"set": True}
    now = await probe(virt, src.name)
    assert abs(int(now["time"]) - time.time()) < 5, "the source's clock was not set after unfreeze"
    # The source still boots with its own NVRAM (OVMF from disk, systemd-boot).
    await virt.destroy(src.name)
    await virt.start(src.name)
    assert await dg.wait_running(virt, src.name) == "running"
    assert (await probe(virt, src.name))["boot_id"] != before["boot_id"]


async def test_running_uefi_source_with_generic_kernel_sees_its_new_vm_generation_id(world):
    scratch, virt, _daemon, config = world
    src = await dg.boot(virt, scratch, "db-gen", firmware="uefi", kernel="generic")
    _, src_forks = await dg.gexec(virt, src.name, FORKS)
    job = await clone(config, {"source": src.name, "name": "db-gc", "keep_ssh_host_keys": True})
    (c,) = job["result"]["clones"]
    reset = c["identity"]["reset"]
    assert reset["vm_generation_id"]["status"] == "reset", reset
    assert reset["ssh_host_keys"]["status"] == "kept"
    _, clone_forks = await dg.gexec(virt, c["name"], FORKS)
    # The kernel's vmgenid driver saw the new ID and reseeded its generator.
    assert int(clone_forks.strip()) == int(src_forks.strip()) + 1, (src_forks, clone_forks)
    src_p, clone_p = await probe(virt, src.name), await probe(virt, c["name"])
    assert clone_p["ssh_fp"] == src_p["ssh_fp"]  # kept on request
    assert clone_p["machine_id"] != src_p["machine_id"]
    # A running UEFI source: the clone's NVRAM is its own copy, taken at stun.
    assert src.nvram is not None and Path(c["nvram"]) != src.nvram
    assert Path(c["nvram"]).read_bytes() == src.nvram.read_bytes()

"""Preflight analysis (instaclone.preflight) over domain XML variants: pure, no libvirt."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from instaclone.config import Config
from instaclone.hv import hostfs
from instaclone.jobs import preflight as pf, prepare as pp
from instaclone.jobs.customize import has_agent_channel
from instaclone_plugins._filecow_xml import FIX_MEMORY, has_shared_file_ram
from instaclone_plugins.filecow import FREE_PAGE_REPORTING, FileCowMemory
from instaclone_plugins.saverestore import SaveRestoreMemory

#: The default memory backends, as preflight and prepare ask them (pure: no hypervisor needed).
BACKENDS = [FileCowMemory(config=Config(), virt=None), SaveRestoreMemory(config=Config(), virt=None)]
#: What prepare gives a definition (the core's and filecow's).
PREPARED = ["cow_memory", "mac_reset", "guest_customization", "vm_generation_id"]

#: A source with every capability: shared file RAM, ACPI, agent channel, genid, qcow2 disk.
READY = """<domain type='kvm'>
  <name>src</name>
  <uuid>6f1c5a2e-8a8e-4c55-9a57-0c1c2f0f7e11</uuid>
  <genid>0d5b5a3e-4b0a-4bb1-8f2e-5a8f3e2d1c00</genid>
  <memory unit='KiB'>262144</memory>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/src.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <source file='/srv/iso/seed.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='network'><mac address='52:54:00:00:00:01'/><source network='default'/>
      <model type='virtio'/></interface>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>"""

RUNNING = pf.Facts(state="running", agent_ping=True, chain_depths={"vda": 2}, max_chain_depth=32,
                   memory_backends=[("filecow", None), ("saverestore", None)], backends=BACKENDS)
#: As RUNNING, for a source filecow cannot serve.
NOT_SHARED = pf.Facts(**{**RUNNING.__dict__, "memory_backends": [("filecow", "its RAM is not a shared file"),
                                                                 ("saverestore", None)]})


def edit(xml: str, fn) -> str:
    root = ET.fromstring(xml)
    fn(root)
    return ET.tostring(root, encoding="unicode")


def remove(path: str):
    def fn(root: ET.Element) -> None:
        parent_path, _, tag = path.rpartition("/")
        parent = root.find(parent_path) if parent_path else root
        for el in parent.findall(tag):
            parent.remove(el)
    return fn


def add(parent_path: str, snippet: str):
    def fn(root: ET.Element) -> None:
        parent = root.find(parent_path) if parent_path else root
        parent.append(ET.fromstring(snippet))
    return fn


def item(report: pf.Report, cap: str, device: str | None = None) -> pf.Finding:
    found = [f for f in report.checks if f.capability == cap and (device is None or f.device == device)]
    assert len(found) == 1, (cap, device, report.checks)
    return found[0]


def test_ready_source_is_cloneable_and_all_ok():
    report = pf.check(READY, RUNNING)
    assert report.cloneable
    assert all(f.ok and f.level == "ok" for f in report.checks), [f for f in report.checks if not f.ok]
    d = report.to_dict()
    assert d["cloneable"] is True and d["source"] == "src" and d["state"] == "running"
    for c in d["checks"]:
        assert set(c) >= {"capability", "ok", "level", "detail", "fix"}
    assert {c["capability"] for c in d["checks"]} == {
        "state", "cow_memory", "mac_reset", "guest_customization", "vm_generation_id", "firmware", "tpm",
        "disk", "chain_depth", "host_state"}
    # The read-only CD-ROM is fine and has no chain check.
    assert item(report, "disk", "sda").ok
    assert [f.device for f in report.checks if f.capability == "chain_depth"] == ["vda"]


def test_anonymous_ram_warns_with_the_memory_backing_fix():
    report = pf.check(edit(READY, remove("memoryBacking")), NOT_SHARED)
    f = item(report, "cow_memory")
    assert (f.ok, f.level) == (False, "warn")
    assert f.fix == "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"
    assert "saverestore" in f.detail and report.cloneable


def test_private_file_ram_is_not_enough():
    xml = READY.replace("<access mode='shared'/>", "<access mode='private'/>")
    f = item(pf.check(xml, NOT_SHARED), "cow_memory")
    assert not f.ok and "'private'" in f.detail and f.fix == FIX_MEMORY


def test_no_memory_backend_can_serve_is_an_error():
    facts = pf.Facts(state="running", memory_backends=[("filecow", "its RAM is not a shared file")],
                     backends=BACKENDS)
    report = pf.check(edit(READY, remove("memoryBacking")), facts)
    assert item(report, "cow_memory").level == "error" and not report.cloneable


def test_numa_guest_cannot_use_filecow():
    xml = edit(READY, add("", "<cpu><numa><cell id='0' cpus='0' memory='262144' unit='KiB'/></numa></cpu>"))
    f = item(pf.check(xml, NOT_SHARED), "cow_memory")
    assert not f.ok and "NUMA" in f.detail and "numa" in f.fix


def test_mac_reset_needs_acpi():
    report = pf.check(edit(READY, remove("features/acpi")), RUNNING)
    f = item(report, "mac_reset")
    assert (f.ok, f.level, f.fix) == (False, "error", "<features><acpi/></features>")
    assert "--keep-network" in f.detail and not report.cloneable
    # Without NICs there is no MAC to reset.
    f = item(pf.check(edit(edit(READY, remove("features/acpi")), remove("devices/interface")), RUNNING), "mac_reset")
    assert f.ok


def test_guest_customization_needs_an_agent_channel():
    f = item(pf.check(edit(READY, remove("devices/channel")), RUNNING), "guest_customization")
    assert (f.ok, f.level) == (False, "warn")
    assert f.fix == "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"


def test_guest_customization_silent_agent_is_an_error():
    facts = pf.Facts(state="running", agent_ping=False, agent_error="guest agent is not connected")
    report = pf.check(READY, facts)
    f = item(report, "guest_customization")
    assert (f.ok, f.level) == (False, "error") and "not connected" in f.detail and "--no-customize" in f.detail
    # Not asked (paused, shut off): the channel is all we can tell.
    assert item(pf.check(READY, pf.Facts(state="paused")), "guest_customization").ok


def test_vm_generation_id():
    f = item(pf.check(edit(READY, remove("genid")), RUNNING), "vm_generation_id")
    assert (f.ok, f.level, f.fix) == (False, "warn", "<genid/>")
    f = item(pf.check(READY, RUNNING), "vm_generation_id")
    assert f.ok and "VMGENID driver" in f.detail and "Debian" in f.detail


def test_uefi_with_nvram_is_fine():
    xml = READY.replace("<os>", "<os firmware='efi'><loader readonly='yes' type='pflash'>/usr/share/OVMF/"
                        "OVMF_CODE_4M.fd</loader><nvram>/var/lib/libvirt/qemu/nvram/src_VARS.fd</nvram>")
    report = pf.check(xml, RUNNING)
    f = item(report, "firmware")
    assert f.ok and "own copy" in f.detail and "src_VARS.fd" in f.detail and report.cloneable


def test_writable_firmware_image_is_refused():
    xml = READY.replace("<os>", "<os><loader readonly='no' type='pflash'>/srv/fw.fd</loader>")
    f = item(pf.check(xml, RUNNING), "firmware")
    assert f.level == "error" and "/srv/fw.fd" in f.detail and "readonly='yes'" in f.fix


def test_bios_is_fine():
    assert item(pf.check(READY, RUNNING), "firmware").detail.startswith("BIOS")


def test_emulated_tpm_is_refused_naming_the_device():
    xml = edit(READY, add("devices", "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"))
    report = pf.check(xml, RUNNING)
    f = item(report, "tpm")
    assert (f.ok, f.level) == (False, "error") and not report.cloneable
    assert "tpm-crb" in f.detail and "emulator" in f.detail and "refused" in f.detail and "swtpm" in f.detail
    assert f.device == "tpm-crb" and f.fix.startswith("remove from <devices>: <tpm model='tpm-crb'>")


def test_passthrough_tpm_is_refused():
    xml = edit(READY, add("devices", "<tpm model='tpm-tis'><backend type='passthrough'>"
                                     "<device path='/dev/tpm0'/></backend></tpm>"))
    f = item(pf.check(xml, RUNNING), "tpm")
    assert f.level == "error" and "passthrough" in f.detail and "/dev/tpm0" in f.detail


def test_shareable_disk_is_refused():
    xml = edit(READY, add("devices", "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                                     "<source file='/srv/shared.img'/><target dev='vdb'/><shareable/></disk>"))
    report = pf.check(xml, RUNNING)
    f = item(report, "disk", "vdb")
    assert (f.ok, f.level) == (False, "error") and "shareable" in f.detail and "vdb" in f.detail
    assert not report.cloneable and item(report, "disk", "vda").ok


@pytest.mark.parametrize("snippet,what", [
    ("<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg0/data'/>"
     "<target dev='vdb'/></disk>", "/dev/vg0/data"),
    ("<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='rbd' "
     "name='pool/img'/><target dev='vdb'/></disk>", "pool/img"),
    ("<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='default' "
     "volume='data.qcow2'/><target dev='vdb'/></disk>", "data.qcow2"),
])
def test_non_file_writable_disks_are_refused(snippet, what):
    report = pf.check(edit(READY, add("devices", snippet)), RUNNING)
    f = item(report, "disk", "vdb")
    assert f.level == "error" and "vdb" in f.detail and what in f.detail and "type='file'" in f.fix
    assert not report.cloneable


def test_read_only_block_cdrom_is_fine():
    xml = edit(READY, add("devices", "<disk type='block' device='cdrom'><source dev='/dev/sr0'/>"
                                     "<target dev='sdb'/><readonly/></disk>"))
    report = pf.check(xml, RUNNING)
    assert item(report, "disk", "sdb").ok and report.cloneable


def test_unsupported_image_format_is_refused():
    xml = READY.replace("type='qcow2'/>\n      <source file='/var/lib/libvirt/images/src.qcow2'",
                        "type='vmdk'/>\n      <source file='/var/lib/libvirt/images/src.vmdk'")
    f = item(pf.check(xml, RUNNING), "disk", "vda")
    assert f.level == "error" and "vmdk" in f.detail


def test_no_writable_disk_is_refused():
    report = pf.check(edit(READY, remove("devices/disk")), RUNNING)
    assert any(f.capability == "disk" and f.level == "error" for f in report.checks) and not report.cloneable


def test_chain_depth_against_the_limit():
    deep = pf.Facts(state="running", chain_depths={"vda": 40}, max_chain_depth=32)
    f = item(pf.check(READY, deep), "chain_depth")
    assert (f.ok, f.level) == (False, "warn") and "40" in f.detail and "32" in f.detail
    assert "after the next clone job" in f.detail
    f = item(pf.check(READY, pf.Facts(state="paused", chain_depths={"vda": 40}, max_chain_depth=32)), "chain_depth")
    assert "only while the domain runs" in f.detail
    f = item(pf.check(READY, pf.Facts(state="running", chain_depths={"vda": "qemu-img failed"})), "chain_depth")
    assert f.level == "warn" and "qemu-img failed" in f.detail


@pytest.mark.parametrize("state,frozen,ok", [("running", False, True), ("paused", False, True),
                                             ("paused", True, True), ("shutoff", False, False),
                                             ("crashed", False, False)])
def test_state(state, frozen, ok):
    report = pf.check(READY, pf.Facts(state=state, frozen=frozen))
    f = item(report, "state")
    assert f.ok is ok and report.cloneable is ok
    if frozen:
        assert "frozen by instaclone" in f.detail


BARE = """<domain type='qemu'><name>bare</name><uuid>11111111-2222-3333-4444-555555555555</uuid>
  <memory unit='KiB'>262144</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/srv/bare.qcow2'/>
      <target dev='vda'/></disk>
    <interface type='user'><mac address='52:54:00:00:00:02'/></interface>
  </devices>
  <metadata><app:info xmlns:app='https://example.com/app/1'>keep me</app:info></metadata>
</domain>"""


def test_prepare_adds_what_is_missing_and_is_idempotent():
    prep = pp.prepare_definition(BARE, BACKENDS)
    assert [c.split(":")[0] for c in prep.changed] == PREPARED
    assert prep.not_changed == ()
    root = ET.fromstring(prep.xml)
    assert has_shared_file_ram(root) and pf.has_acpi(root) and has_agent_channel(root) and pf.has_genid(root)
    # Untouched: disks, NICs, foreign metadata (with its namespace prefix).
    assert root.find("./devices/disk/source").get("file") == "/srv/bare.qcow2"
    assert "app:info" in prep.xml and "keep me" in prep.xml
    after = pf.check(prep.xml, pf.Facts(state="shutoff", memory_backends=RUNNING.memory_backends, backends=BACKENDS))
    assert all(f.ok for f in after.checks if f.capability in PREPARED)
    again = pp.prepare_definition(prep.xml, BACKENDS)
    assert again.changed == () and again.xml == prep.xml
    d = pp.diff(BARE, prep.xml, "bare")
    assert d.startswith("--- bare (before)\n+++ bare (after)\n")
    added = [line for line in d.splitlines() if line.startswith("+") and not line.startswith("+++")]
    removed = [line for line in d.splitlines() if line.startswith("-") and not line.startswith("---")]
    assert removed == [] and any("memoryBacking" in a for a in added) and any("acpi" in a for a in added)
    assert any("org.qemu.guest_agent.0" in a for a in added) and any("genid" in a for a in added)
    assert pp.diff(prep.xml, prep.xml, "bare") == ""


def test_prepare_changes_private_ram_to_shared_in_place():
    xml = BARE.replace("<os>", "<memoryBacking><locked/><source type='memfd'/><access mode='private'/>"
                               "</memoryBacking><os>")
    root = ET.fromstring(pp.prepare_definition(xml, BACKENDS).xml)
    mb = root.findall("memoryBacking")
    assert len(mb) == 1 and mb[0].find("locked") is not None
    assert mb[0].find("source").get("type") == "file" and mb[0].find("access").get("mode") == "shared"


def test_prepare_never_touches_what_it_cannot_fix():
    xml = edit(BARE, add("devices", "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"))
    xml = edit(xml, add("", "<cpu><numa><cell id='0' cpus='0' memory='262144' unit='KiB'/></numa></cpu>"))
    prep = pp.prepare_definition(xml, BACKENDS)
    root = ET.fromstring(prep.xml)
    assert root.find("./devices/tpm") is not None and root.find("./cpu/numa") is not None
    assert root.find("memoryBacking") is None  # NUMA: RAM left as it is
    assert any(n.startswith("tpm tpm-crb:") for n in prep.not_changed), prep.not_changed
    assert any(n.startswith("cow_memory:") and "NUMA" in n for n in prep.not_changed), prep.not_changed
    assert [c.split(":")[0] for c in prep.changed] == ["mac_reset", "guest_customization", "vm_generation_id"]


def test_pending_until_next_boot():
    live = BARE
    persistent = pp.prepare_definition(BARE, BACKENDS).xml
    report = pf.check(live, pf.Facts(**{**NOT_SHARED.__dict__, "inactive_xml": persistent}))
    assert report.pending == PREPARED
    f = item(report, "cow_memory")
    assert f.pending and not f.ok and "pending: the persistent definition has it, applies at next boot" in f.detail
    assert f.fix is None  # nothing left to change in the definition
    assert pp.pending(live, persistent, BACKENDS) == report.pending
    # Shut off: the definition is what runs next, nothing is pending.
    assert pf.check(persistent, pf.Facts(state="shutoff", inactive_xml=persistent, backends=BACKENDS)).pending == []


# -- the host's RAM filesystem (libvirt's memory_backing_dir) ------------------------------

@pytest.mark.parametrize("conf,path,configured", [
    ("", hostfs.DEFAULT_MEMORY_BACKING_DIR, False),
    ('#memory_backing_dir = "/var/lib/libvirt/qemu/ram"\n', hostfs.DEFAULT_MEMORY_BACKING_DIR, False),
    ('memory_backing_dir = "/dev/shm/ram"\n', "/dev/shm/ram", True),
    ("  memory_backing_dir='/x'  # set\n", "/x", True),
    ('memory_backing_dir = "/a"\nmemory_backing_dir = "/b"\n', "/b", True),
    ('memory_backing_dir_x = "/a"\n', hostfs.DEFAULT_MEMORY_BACKING_DIR, False),
])
def test_memory_backing_dir_from_qemu_conf(conf, path, configured):
    assert hostfs.memory_backing_dir(conf) == (path, configured)


@pytest.mark.parametrize("magic,ok,level,words", [
    (hostfs.TMPFS_MAGIC, True, "ok", "on tmpfs"),
    (hostfs.HUGETLBFS_MAGIC, True, "ok", "on hugetlbfs"),
    (0xEF53, False, "warn", "on ext4, a disk filesystem"),
    (0x58465342, False, "warn", "on xfs, a disk filesystem"),
    (0x12345678, False, "warn", "on f_type 0x12345678, a disk filesystem"),
    (hostfs.RAMFS_MAGIC, False, "warn", "ramfs"),
])
def test_ram_filesystem_decided_by_fs_type(magic, ok, level, words):
    ram = hostfs.RamDir("/var/lib/libvirt/qemu/ram", False, fs_type=magic, checked="/var/lib/libvirt/qemu/ram")
    f = pf.ram_filesystem(ram)
    assert (f.capability, f.ok, f.level) == ("ram_filesystem", ok, level)
    assert words in f.detail and "libvirt's default" in f.detail
    if ok:
        assert f.fix is None
    else:
        assert "mount -t tmpfs" in f.fix and "/var/lib/libvirt/qemu/ram" in f.fix
    if level == "warn" and magic != hostfs.RAMFS_MAGIC:
        assert "writeback" in f.detail


def test_ram_filesystem_unknown_or_not_made_yet():
    f = pf.ram_filesystem(hostfs.RamDir("/srv/ram", True, error="statfs /srv: Permission denied", checked="/srv"))
    assert (f.ok, f.level) == (False, "warn") and "Permission denied" in f.detail and f.fix
    f = pf.ram_filesystem(hostfs.RamDir("/srv/ram", True, fs_type=hostfs.TMPFS_MAGIC, checked="/srv"))
    assert f.ok and "not made yet: judged by /srv" in f.detail and "libvirt's default" not in f.detail


def test_ram_filesystem_is_a_host_finding_only_when_gathered():
    assert "ram_filesystem" not in {f.capability for f in pf.check(READY, RUNNING).checks}
    disk = hostfs.RamDir("/r", False, fs_type=0xEF53, checked="/r")
    report = pf.check(READY, pf.Facts(**{**RUNNING.__dict__, "ram_dir": disk}))
    assert report.checks[-1].capability == "ram_filesystem" and report.checks[-1].level == "warn"
    assert report.cloneable  # a warning: clones work, their stun grows with the RAM copied


def test_ram_dir_reads_qemu_conf_and_statfs(tmp_path):
    conf = tmp_path / "qemu.conf"
    conf.write_text('memory_backing_dir = "/dev/shm/instaclone-test-not-made/ram"\n')
    ram = hostfs.ram_dir(conf)
    assert ram.path == "/dev/shm/instaclone-test-not-made/ram" and ram.configured
    assert ram.checked == "/dev/shm" and ram.fs_type == hostfs.TMPFS_MAGIC and ram.on_memory_fs
    conf.write_text(f'memory_backing_dir = "{tmp_path}"\n')
    assert hostfs.ram_dir(conf).fs_type == hostfs.fs_magic(str(tmp_path)) != 0
    missing = hostfs.ram_dir(tmp_path / "absent.conf")
    assert (missing.path, missing.configured) == (hostfs.DEFAULT_MEMORY_BACKING_DIR, False)
    with pytest.raises(OSError):
        hostfs.fs_magic(str(tmp_path / "absent"))


def test_virtio_balloon_warns_about_inflating_filecow_clones():
    xml = edit(READY, add("devices", "<memballoon model='virtio'/>"))
    f = item(pf.check(xml, RUNNING), "balloon")
    assert (f.ok, f.level) == (True, "warn") and "setmem" in f.detail and "siblings" in f.detail


def test_free_page_reporting_balloon_keeps_filecow_away():
    xml = edit(READY, add("devices", "<memballoon model='virtio' freePageReporting='on'/>"))
    facts = pf.Facts(**{**RUNNING.__dict__, "memory_backends": [("filecow", FREE_PAGE_REPORTING),
                                                                ("saverestore", None)]})
    f = item(pf.check(xml, facts), "balloon")
    assert (f.ok, f.level) == (False, "warn") and "punched out of the RAM image" in f.detail
    assert "clones use saverestore instead" in f.detail
    assert "<memballoon model='none'/>" in (f.fix or "")
    assert not [x for x in pf.check(edit(READY, add("devices", "<memballoon model='none'/>")), RUNNING).checks
                if x.capability == "balloon"]

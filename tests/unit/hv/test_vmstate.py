"""Per-VM state: what a clone would share with its source, and what the engine does about it.

Pure XML tests of :mod:`instaclone.hv.vmstate` and :func:`domxml.clone_xml`, then
engine tests on the fake hypervisor: a UEFI source's clone gets its own NVRAM
copy (recorded, removed with the clone or on rollback), the source's file is
never written or deleted, TPM and shareable disks are refused by name.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from instaclone.errors import LibvirtError, SourceNotCloneable
from instaclone.hv import domxml, vmstate
from instaclone.requests import CloneRequest, FreezeRequest
from instaclone.states import State
from tests.support.enginelib import leftover_files, run_job

BASE = """<domain type='qemu'><name>src</name><uuid>6f1d1f0a-0000-4000-8000-000000000001</uuid>
  <memory unit='KiB'>262144</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type>{os}</os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/var/lib/x/src.qcow2'/><target dev='vda' bus='virtio'/></disk>
    {devices}
    <interface type='user'><mac address='52:54:00:00:00:01'/><model type='virtio'/></interface>
    <serial type='file'><source path='/tmp/src.serial.log'/><target port='0'/></serial>
  </devices>
</domain>"""

OVMF = ("<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
        "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{nvram}</nvram>")


def xml(os: str = "", devices: str = "") -> str:
    return BASE.format(os=os, devices=devices)


def decisions(x: str) -> dict[str, str]:
    return {i.device: i.decision for i in vmstate.walk(x)}


def test_plain_source_has_nothing_to_refuse():
    d = decisions(xml())
    assert d["disk vda"] == "delta" and d["serial file"] == "relocate"
    assert vmstate.refusals(xml()) == [] and vmstate.nvram_path(xml()) is None


def test_uefi_nvram_is_copied_and_firmware_code_shared_readonly():
    x = xml(os=OVMF.format(nvram="/var/lib/libvirt/qemu/nvram/src_VARS.fd"))
    d = decisions(x)
    assert d["nvram"] == "copy" and d["firmware code"] == "shared-readonly"
    assert vmstate.nvram_path(x) == Path("/var/lib/libvirt/qemu/nvram/src_VARS.fd")
    assert vmstate.refusals(x) == []


def test_nvram_in_source_element_form():
    x = xml(os="<loader readonly='yes' type='pflash'>/c.fd</loader>"
               "<nvram type='file'><source file='/n/src_VARS.fd'/></nvram>")
    assert vmstate.nvram_path(x) == Path("/n/src_VARS.fd")


def test_writable_firmware_image_is_refused():
    x = xml(os="<loader type='pflash'>/var/lib/x/OVMF.fd</loader>")
    (item,) = vmstate.refusals(x)
    assert item.device == "firmware code" and "writable" in item.why


@pytest.mark.parametrize("backend,word", [
    ("<backend type='emulator' version='2.0'/>", "backend=emulator"),
    ("<backend type='passthrough'><device path='/dev/tpm0'/></backend>", "backend=passthrough"),
])
def test_tpm_is_refused_naming_the_device(backend, word):
    x = xml(devices=f"<tpm model='tpm-crb'>{backend}</tpm>")
    (item,) = vmstate.refusals(x)
    assert "tpm model=tpm-crb" in item.device and word in item.device
    msg = vmstate.refusal_message("src", [item])
    assert "tpm model=tpm-crb" in msg and "src" in msg


def test_shareable_block_and_network_disks_are_refused_readonly_ones_shared():
    x = xml(devices="""
      <disk type='file' device='disk'><source file='/s/shared.img'/><target dev='vdb'/><shareable/></disk>
      <disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vdc'/></disk>
      <disk type='network' device='disk'><source protocol='rbd' name='pool/img'/><target dev='vdd'/></disk>
      <disk type='file' device='cdrom'><source file='/s/seed.iso'/><target dev='sda'/><readonly/></disk>
      <disk type='file' device='disk'><source file='/s/ro.img'/><target dev='vde'/><readonly/></disk>""")
    d = decisions(x)
    assert d["disk vdb"] == d["disk vdc"] == d["disk vdd"] == "refuse"
    assert d["cdrom sda"] == d["disk vde"] == "shared-readonly"
    refused = {i.device for i in vmstate.refusals(x)}
    assert refused == {"disk vdb", "disk vdc", "disk vdd"}


def test_host_state_devices_are_refused():
    x = xml(devices="""
      <filesystem type='mount'><source dir='/srv/share'/><target dir='share'/></filesystem>
      <hostdev mode='subsystem' type='pci'/>
      <serial type='tcp'><source mode='bind' host='127.0.0.1' service='4555'/><target port='1'/></serial>""")
    refused = {i.device for i in vmstate.refusals(x)}
    assert refused == {"filesystem share", "hostdev", "serial tcp"}


def test_clone_xml_points_at_the_clones_nvram_and_never_keeps_the_sources():
    x = xml(os=OVMF.format(nvram="/var/lib/libvirt/qemu/nvram/src_VARS.fd"))
    ident = domxml.CloneIdentity(name="c1", uuid="6f1d1f0a-0000-4000-8000-0000000000c1",
                                 macs=["52:54:00:aa:bb:cc"], dir=Path("/st/clones/c1"),
                                 disks={"vda": Path("/st/clones/c1/vda.qcow2")}, source="src",
                                 nvram=Path("/st/clones/c1/c1_VARS.fd"))
    out = ET.fromstring(domxml.clone_xml(x, ident))
    assert out.findtext("./os/nvram") == "/st/clones/c1/c1_VARS.fd"
    assert out.find("./os/loader").text == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    ident.nvram = None
    with pytest.raises(ValueError, match="nvram"):
        domxml.clone_xml(x, ident)
    assert vmstate.clone_nvram_name(Path("/n/src_VARS.fd"), "src", "c1") == "c1_VARS.fd"
    assert vmstate.clone_nvram_name(Path("/n/vars.fd"), "src", "c1") == "c1_VARS.fd"


# -- engine, fake hypervisor ---------------------------------------------------------


def _make_uefi(virt, tmp: Path) -> tuple[Path, str]:
    nvram = tmp / "src_VARS.fd"
    nvram.write_bytes(b"UEFI-VARS" + bytes(range(256)) * 64)
    dom = virt.domains["src"]
    dom.xml = dom.xml.replace("<os><type arch='x86_64'>hvm</type></os>",
                              "<os><type arch='x86_64'>hvm</type>" + OVMF.format(nvram=nvram) + "</os>")
    assert str(nvram) in dom.xml
    return nvram, hashlib.sha256(nvram.read_bytes()).hexdigest()


async def test_uefi_clone_gets_its_own_nvram_copy_removed_on_destroy(env, tmp_path):
    engine, virt, store, c = env
    nvram, digest = _make_uefi(virt, tmp_path)
    job = await run_job(engine, store, name="c1", count=2)
    assert job.state is State.UNSTUNNED, job.error
    for cl in job.result["clones"]:
        own = Path(cl["nvram"])
        assert own != nvram and own.parent == c.clones_dir / cl["name"]
        assert own.read_bytes() == nvram.read_bytes()
        assert (own.stat().st_mode & 0o777) == 0o600
        assert ET.fromstring(virt.domains[cl["name"]].xml).findtext("./os/nvram") == str(own)
    await engine.destroy_clone("c1-1")
    assert not Path(job.result["clones"][0]["nvram"]).exists()
    assert Path(job.result["clones"][1]["nvram"]).exists()
    assert hashlib.sha256(nvram.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("step", ["define", "load_state"])
async def test_nvram_copy_is_rolled_back_with_the_clone(env, tmp_path, step):
    engine, virt, store, c = env
    nvram, digest = _make_uefi(virt, tmp_path)
    virt.fail[step] = LibvirtError("injected")
    job = await run_job(engine, store, name="c1")
    assert job.state is State.FAILED
    assert leftover_files(c) == []
    assert hashlib.sha256(nvram.read_bytes()).hexdigest() == digest
    assert virt.domains["src"].state == "running"


async def test_frozen_uefi_source_clones_copy_the_nvram_taken_at_freeze(env, tmp_path):
    engine, virt, store, c = env
    nvram, _ = _make_uefi(virt, tmp_path)
    await engine.freeze(FreezeRequest("src"))
    at_freeze = c.daemon.state_dir / "frozen" / "src" / "nvram.fd"
    assert at_freeze.read_bytes() == nvram.read_bytes()
    nvram.write_bytes(b"changed behind our back")  # not what the clone must get
    job = await run_job(engine, store, name="c1")
    assert job.state is State.UNSTUNNED, job.error
    assert Path(job.result["clones"][0]["nvram"]).read_bytes().startswith(b"UEFI-VARS")
    await engine.unfreeze(FreezeRequest("src"))
    assert not at_freeze.exists() and nvram.read_bytes() == b"changed behind our back"


async def test_tpm_source_is_refused_at_submit_and_freeze(env):
    engine, virt, store, _ = env
    dom = virt.domains["src"]
    dom.xml = dom.xml.replace("</devices>", "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/>"
                                            "</tpm></devices>")
    with pytest.raises(SourceNotCloneable, match="tpm model=tpm-crb backend=emulator"):
        await engine.submit(CloneRequest(source="src", name="c1"))
    with pytest.raises(SourceNotCloneable, match="tpm"):
        await engine.freeze(FreezeRequest("src"))
    assert dom.state == "running" and not await store.list_jobs()


@pytest.mark.parametrize("devices", [
    "<filesystem type='mount'><source dir='/srv/share'/><target dir='share'/></filesystem>",
    "<hostdev mode='subsystem' type='pci'/>",
    "<shmem name='ivshmem'/>",
    "<interface type='vhostuser'><source type='unix' path='/run/vu.sock' mode='client'/></interface>",
    "<serial type='tcp'><source mode='bind' host='127.0.0.1' service='4555'/><target port='1'/></serial>",
    "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>",
    "<disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vdc'/></disk>",
    # Judged by vmstate in both: a read-only disk that is also shareable is still refused.
    "<disk type='file' device='disk'><source file='/srv/s.img'/><target dev='vdd'/><readonly/><shareable/></disk>",
])
def test_preflight_check_and_the_engine_agree_on_refusals(devices):
    from instaclone.jobs import preflight

    x = xml(devices=devices)
    assert vmstate.refusals(x)
    report = preflight.check(x)
    assert not report.cloneable

"""check-config reports the log_dir serve would refuse, with serve's own message: a file serve opens in it that is a
directory (the lock, deployment.json, a log), a directory the kernel makes nothing in (/proc/logs, even for root),
a path under a regular file or through a symlink to nothing. It makes nothing to find out."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from pdlaunch.config.loader import load_deployment
from pdlaunch.config.rules import host
from tests.config.cli_helpers import assert_invalid, check, invoke
from tests.helpers.ports import free_port

CPU = ["--model", "tiny", "--device", "cpu", "--colocated"]


def _problem_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error: --log-dir:")]
    assert len(lines) == 1, output
    return lines[0]


def _same_refusal_from_check_config_and_serve(log_dir: Path | str, text: str) -> None:
    checked = check([*CPU, "--log-dir", str(log_dir)])
    assert_invalid(checked, "--log-dir", text)
    served = invoke(["serve", *CPU, "--log-dir", str(log_dir), "--port", str(free_port())])
    assert served.exit_code == 1, served.output
    assert _problem_line(checked.output) in served.output, served.output


@pytest.mark.parametrize("name", [".pdlaunch.lock", "deployment.json", "colocated-0.log", "proxy.log"])
def test_a_file_serve_opens_in_log_dir_that_is_a_directory(tmp_path: Path, name: str) -> None:
    (tmp_path / "logs" / name).mkdir(parents=True)
    _same_refusal_from_check_config_and_serve(tmp_path / "logs", f"{str(tmp_path / 'logs' / name)!r} is a directory")
    assert_invalid(check([*CPU, "--log-dir", str(tmp_path / "logs")]), "--log-dir", "remove it or pass --log-dir")


def test_another_nodes_lock_is_not_this_nodes_problem(tmp_path: Path) -> None:
    (tmp_path / "logs" / ".pdlaunch.node1.lock").mkdir(parents=True)  # node 1's, in a shared directory
    assert check([*CPU, "--log-dir", str(tmp_path / "logs")]).exit_code == 0


def test_a_log_dir_under_proc(tmp_path: Path) -> None:
    """/proc takes no new directory, even from root, for whom the permission look passes."""
    _same_refusal_from_check_config_and_serve("/proc/pdlaunch-check-logs",
                                              "'/proc' is on the kernel's proc file system")
    assert not Path("/proc/pdlaunch-check-logs").exists()


def test_a_log_dir_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    _same_refusal_from_check_config_and_serve(tmp_path / "f" / "sub" / "logs", f"{str(tmp_path / 'f')!r} is a file")
    _same_refusal_from_check_config_and_serve(f"{tmp_path}/f/../logs", f"{str(tmp_path / 'f')!r} is a file")


def test_a_log_dir_that_is_a_symlink_to_nothing(tmp_path: Path) -> None:
    (tmp_path / "logs").symlink_to(tmp_path / "gone")
    _same_refusal_from_check_config_and_serve(tmp_path / "logs", "is a symlink to")


def test_check_config_makes_no_directory(tmp_path: Path) -> None:
    assert check([*CPU, "--log-dir", str(tmp_path / "a" / "logs")]).exit_code == 0
    assert list(tmp_path.iterdir()) == []


def test_the_kernel_file_system_is_found_by_the_deepest_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mount points as /proc/self/mountinfo writes them: spaces escaped, optional tags before the "-"."""
    spaced = tmp_path / "a b"
    (spaced / "disk").mkdir(parents=True)
    escaped = str(spaced).replace(" ", "\\040")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"21 1 0:5 / / rw - ext4 /dev/sda1 rw\n"
                         f"22 21 0:6 / {escaped} rw,nosuid shared:7 - sysfs sysfs rw\n"
                         f"23 22 0:7 / {escaped}/disk rw - tmpfs tmpfs rw\n")
    monkeypatch.setattr(host, "MOUNTINFO", mountinfo)
    assert host.writable_dir_problems("log_dir", str(spaced / "logs"), "fix")[0].message == (
        f"{str(spaced / 'logs')!r} cannot be created: {str(spaced)!r} is on the kernel's sysfs file system, where "
        "no directory or file can be made; fix")
    assert host.writable_dir_problems("log_dir", str(spaced / "disk" / "logs"), "fix") == []


def test_a_log_dir_under_the_home_directory_is_the_homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`log_dir: ~/pd-logs` in the YAML file (or `--log-dir=~/pd-logs`, which the shell leaves as it is) made a
    directory named `~` where serve ran, as no other path of the config is read: its logs were not where the user
    looked, and `rm -rf ~` is how such a directory gets cleaned up."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    path = work / "deploy.yaml"
    path.write_text("log_dir: ~/pd-logs\n")
    assert load_deployment(path, {}).log_dir == str(home / "pd-logs")
    assert load_deployment(None, {"log_dir": "~/pd-logs"}).log_dir == str(home / "pd-logs")
    (home / "pd-logs").mkdir(mode=0o755)
    (home / "pd-logs").chmod(0o775)  # checked where serve writes: the home's directory, not ./~/pd-logs
    assert_invalid(check([*CPU, str(path)]), "log_dir", f"{str(home / 'pd-logs')!r} is writable by its group")
    assert not (work / "~").exists()


def test_a_log_dir_in_the_home_of_no_user(tmp_path: Path) -> None:
    assert_invalid(check([*CPU, "--log-dir", "~pdlaunch-no-such-user/logs"]), "--log-dir",
                   "'~pdlaunch-no-such-user/logs' names the home directory of no user here")


@pytest.mark.parametrize("name", ["it's $HOME", "back\\slash", "-logs"])
def test_the_chmod_a_group_writable_log_dir_is_told_to_run_is_one_a_shell_runs(
        tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log_dir made with umask 002 (0775) is refused with the command that fixes it. The path was Python's repr:
    `chmod go-w "it's $HOME"` expands $HOME, a backslash came out doubled, naming another path, and `-logs` was read as
    chmod's options."""
    monkeypatch.chdir(tmp_path)
    log_dir = tmp_path / name
    log_dir.mkdir()
    log_dir.chmod(0o775)
    given = name if name.startswith("-") else str(log_dir)  # `-logs`: relative, as the user would give it
    line = _problem_line(check([*CPU, f"--log-dir={given}"]).output)
    command = line.split("run `", 1)[1].split("`", 1)[0]
    ran = subprocess.run(["sh", "-c", command], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert ran.returncode == 0, (command, ran.stderr)
    assert stat.S_IMODE(log_dir.stat().st_mode) == 0o755
    assert check([*CPU, "--log-dir", str(log_dir)]).exit_code == 0, command

"""Ansible callback plugin `edgeres_retry`, copied by `edgeres fleet ansible` into OUT/callback_plugins/: the retry
file lists every host of the play that is not done, not only the failed ones.

Ansible's own retry file names the failed and unreachable hosts; the hosts of the batches a stopped rollout never
reached (max_fail_percentage, any_errors_fatal, Ctrl-C) are missing from it, so `--limit @retry/deploy.retry` would
leave them on the old release. This plugin writes RETRY_DIR/<playbook>.retry itself (ansible.cfg turns Ansible's
own off): every host of the play (the play's first task reports them, --limit applied) for which no task
registering DONE_REGISTER succeeded (the device's answer to activate: committed; or the release already ran,
committed), rewritten atomically after each event, so an interrupted run leaves it right too; deleted when every
host is done. Check mode writes nothing (a check changes nothing).

Standalone: imports only Ansible (it runs inside ansible-playbook, which may not have edgeres installed).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ansible import context
from ansible.plugins.callback import CallbackBase

PLAY_HOSTS_FACT = "edgeres_play_hosts"     # set by the play's first task: ansible_play_hosts_all (--limit applied)
DONE_REGISTER = "edgeres_done"             # a task that succeeds only on a host running the release, committed
RETRY_DIR = "retry"


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "edgeres_retry"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.path: Path | None = None
        self.hosts: list[str] = []
        self.done: set[str] = set()

    def v2_playbook_on_start(self, playbook) -> None:
        if context.CLIARGS.get("check"):
            return
        self.path = Path(playbook._basedir) / RETRY_DIR / f"{Path(playbook._file_name).stem}.retry"

    def v2_runner_on_ok(self, result) -> None:
        if self.path is None:
            return
        task = getattr(result, "task", None) or result._task
        host = (getattr(result, "host", None) or result._host).get_name()
        facts = (getattr(result, "result", None) or result._result).get("ansible_facts") or {}
        new = [h for h in facts.get(PLAY_HOSTS_FACT) or [] if h not in self.hosts]
        if task.register == DONE_REGISTER:
            self.done.add(host)
        elif not new:
            return
        self.hosts += new
        self._write()

    def _write(self) -> None:
        left = [h for h in self.hosts if h not in self.done]
        if not left:
            if self.path.is_file() and not self.path.is_symlink():
                self.path.unlink()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{h}\n" for h in left))
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.path)

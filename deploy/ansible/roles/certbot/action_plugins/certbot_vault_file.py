"""Read or write a file on the controller encrypted with the play's own vault secret, in memory.

The secret is the one the play was started with (--ask-vault-pass, --vault-password-file, --vault-id), the
same that unlocks the inventory's vault files, so whoever can run the playbook can read the file and nobody
else. The plain text never touches the controller's disk: it is encrypted before the file is written and
decrypted after it is read.

    certbot_vault_file:
      path: /abs/path/file.vault
      state: read | written
      content: "..."        # with state: written

Returns ``vault_secret`` (whether the play has one) and, for ``read``, ``exists`` and ``content``.
"""

from __future__ import annotations

import os
import tempfile

from ansible import constants as C
from ansible.errors import AnsibleError
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.parsing.vault import VaultLib, is_encrypted, match_encrypt_secret
from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False
    _VALID_ARGS = frozenset(("path", "state", "content"))

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = self._task.args
        path = args.get("path")
        state = args.get("state", "read")
        if not path or not os.path.isabs(path):
            return {**result, "failed": True, "msg": f"path must be an absolute path on the controller, not {path!r}"}
        if state not in ("read", "written"):
            return {**result, "failed": True, "msg": f"state must be read or written, not {state!r}"}
        secrets = self._loader._vault.secrets or []
        result.update(vault_secret=bool(secrets), path=path, changed=False)
        if state == "read":
            return self._read(result, path, secrets)
        if not secrets:
            return {**result, "failed": True, "msg": "no vault secret: run the play with --ask-vault-pass, "
                                                      "--vault-password-file or --vault-id"}
        return self._write(result, path, to_text(args.get("content", "")), secrets)

    def _read(self, result, path, secrets):
        if not os.path.exists(path):
            return {**result, "exists": False, "content": ""}
        result["exists"] = True
        with open(path, "rb") as f:
            data = f.read()
        if not is_encrypted(data):
            return {**result, "failed": True, "reason": "not_encrypted",
                    "msg": f"{path} is not an Ansible Vault file; it is refused so that no plain key material "
                           "is used or kept: remove it (the next run saves a new, encrypted one)"}
        if not secrets:
            return {**result, "content": ""}
        try:
            plain = VaultLib(secrets).decrypt(data)
        except AnsibleError as exc:
            return {**result, "failed": True, "reason": "undecryptable",
                    "msg": f"cannot decrypt {path} with this run's vault secret ({exc.message.splitlines()[0]}); "
                           "run with the vault password it was saved with, or move the file away to give up the "
                           "saved certificate (the next run saves the host's own)"}
        return {**result, "content": to_text(plain, errors="surrogate_or_strict")}

    def _write(self, result, path, content, secrets):
        vault_id, secret = match_encrypt_secret(secrets, C.DEFAULT_VAULT_ENCRYPT_IDENTITY)
        label = vault_id if vault_id != C.DEFAULT_VAULT_IDENTITY else None
        data = VaultLib().encrypt(to_bytes(content), secret, vault_id=label)
        result["changed"] = True
        if self._task.check_mode:
            return result
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp_path, path)
        except BaseException:
            os.unlink(tmp_path)
            raise
        return result

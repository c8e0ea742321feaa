"""Who may read what the pilot writes: owner-only by default (issue 11, defect 12).

The job directory was 0755 and the pilot log, the summary and payload output 0644.
Also the pilot's private copies of its credentials (issue 11, defect 10).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from pilot.logs import JsonLogFile
from pilot.process.environment import copytool_environment, is_denied
from pilot.util.files import FILE_MODES, GROUP, PRIVATE, open_for_append, write_text_atomically
from pilot.util.private import PrivateAreaError, PrivateCredentials, private_directory

PROXY = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class UmaskTestCase(SynchronousTestCase):
    """Runs each test under the usual umask 022 (restored after), so modes are the code's."""

    def setUp(self) -> None:
        previous = os.umask(0o022)
        self.addCleanup(os.umask, previous)
        self.dir = Path(self.mktemp())
        self.dir.mkdir()


class WriterModeTests(UmaskTestCase):
    def test_atomic_writes_are_owner_only_by_default(self) -> None:
        path = self.dir / "pilot_summary.json"
        write_text_atomically(path, "{}")
        self.assertEqual(mode_of(path), 0o600)
        write_text_atomically(path, "{}", durable=False, mode=GROUP.file)
        self.assertEqual(mode_of(path), 0o640)
        self.assertEqual(path.read_text(), "{}")
        self.assertEqual([p.name for p in self.dir.iterdir()], [path.name])

    def test_json_log_is_created_owner_only(self) -> None:
        path = self.dir / "logs" / "pilot.json"
        log_file = JsonLogFile(path)
        log_file.open()
        try:
            Logger().info("hello {who}", who="operator")
        finally:
            log_file.close()
        self.assertEqual(mode_of(path), 0o600)
        self.assertIn('"who": "operator"', path.read_text())

    def test_json_log_keeps_an_existing_files_mode(self) -> None:
        path = self.dir / "pilot.json"
        path.write_text("")
        path.chmod(0o640)
        log_file = JsonLogFile(path)
        log_file.open()
        log_file.close()
        self.assertEqual(mode_of(path), 0o640)

    def test_append_creates_with_the_exact_mode_whatever_the_umask(self) -> None:
        os.umask(0o077)
        path = self.dir / "group.log"
        os.close(open_for_append(path, GROUP.file))
        self.assertEqual(mode_of(path), 0o640)
        descriptor = open_for_append(path, 0o600)
        os.write(descriptor, b"more")
        os.close(descriptor)
        self.assertEqual(mode_of(path), 0o640)
        self.assertEqual(path.read_bytes(), b"more")

    def test_the_site_choice(self) -> None:
        self.assertEqual(set(FILE_MODES), {"private", "group"})
        os.umask(FILE_MODES["private"].umask)
        (self.dir / "job").mkdir(mode=0o755)  # today's job directory mode, under the umask
        with open(self.dir / "payload.stdout", "w"):
            pass
        self.assertEqual(mode_of(self.dir / "job"), PRIVATE.directory)
        self.assertEqual(mode_of(self.dir / "payload.stdout"), PRIVATE.file)
        os.umask(GROUP.umask)
        (self.dir / "job2").mkdir(mode=0o755)
        self.assertEqual(mode_of(self.dir / "job2"), GROUP.directory)


class PrivateCredentialsTests(UmaskTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.proxy = self.dir / "x509up_u1000"
        self.proxy.write_text(PROXY)
        self.proxy.chmod(0o644)  # a careless site
        self.token = self.dir / "token"
        self.token.write_text("opaque-token-value\n")
        self.pilot_dir = self.dir / "txpilot_1_2"
        self.pilot_dir.mkdir(mode=0o750)

    def test_copies_are_owner_only_in_an_owner_only_directory(self) -> None:
        private = PrivateCredentials(
            self.pilot_dir / ".credentials", {"proxy": self.proxy, "token": self.token}
        )
        self.assertEqual(sorted(private.refresh()), ["proxy", "token"])
        paths = private.paths
        self.assertEqual(mode_of(private.directory), 0o700)
        for name, source in (("proxy", self.proxy), ("token", self.token)):
            self.assertEqual(mode_of(paths[name]), 0o600)
            self.assertEqual(paths[name].read_bytes(), source.read_bytes())
            self.assertEqual(paths[name].parent, self.pilot_dir / ".credentials")
        self.assertEqual(sorted(p.name for p in private.directory.iterdir()), ["proxy", "token"])

    def test_a_renewed_proxy_is_copied_again_and_only_then(self) -> None:
        private = PrivateCredentials(self.pilot_dir / ".credentials", {"proxy": self.proxy})
        private.refresh()
        self.assertEqual(private.refresh(), [])
        renewed = PROXY.replace("MIIB", "MIIC-renewed")
        self.proxy.write_text(renewed)
        os.utime(self.proxy, ns=(0, os.stat(self.proxy).st_mtime_ns + 1_000_000_000))
        self.assertEqual(private.refresh(), ["proxy"])
        self.assertEqual(private.paths["proxy"].read_text(), renewed)
        self.assertEqual(mode_of(private.paths["proxy"]), 0o600)

    def test_a_missing_source_is_an_error(self) -> None:
        private = PrivateCredentials(self.pilot_dir / ".credentials", {"proxy": self.dir / "missing"})
        self.assertRaises(FileNotFoundError, private.refresh)

    def test_an_existing_directory_is_made_private_and_must_be_ours(self) -> None:
        directory = self.pilot_dir / ".credentials"
        directory.mkdir(mode=0o755)
        private_directory(directory)
        self.assertEqual(mode_of(directory), 0o700)
        link = self.pilot_dir / "link"
        link.symlink_to(directory)
        self.assertRaises(PrivateAreaError, private_directory, link)
        if os.geteuid() == 0:
            foreign = self.pilot_dir / "foreign"
            foreign.mkdir()
            os.chown(foreign, 65534, 65534)
            self.assertRaises(PrivateAreaError, private_directory, foreign)

    def test_names_are_plain(self) -> None:
        for name in ("", "../proxy", ".hidden"):
            self.assertRaises(ValueError, PrivateCredentials, self.pilot_dir, {name: self.proxy})

    def test_removed_at_the_end(self) -> None:
        private = PrivateCredentials(self.pilot_dir / ".credentials", {"proxy": self.proxy})
        private.refresh()
        private.remove()
        self.assertFalse(private.directory.exists())
        self.assertTrue(self.proxy.exists())


class CredentialEnvironmentTests(SynchronousTestCase):
    def test_copytools_are_pointed_at_the_private_copies(self) -> None:
        environ = {"X509_USER_PROXY": "/tmp/x509up_u1000", "BEARER_TOKEN_FILE": "/run/t", "PATH": "/bin"}
        env = copytool_environment(
            environ, proxy=Path("/p/.credentials/proxy"), token_file=Path("/p/.credentials/token")
        )
        self.assertEqual(env["X509_USER_PROXY"], "/p/.credentials/proxy")
        self.assertEqual(env["BEARER_TOKEN_FILE"], "/p/.credentials/token")
        self.assertEqual(copytool_environment(environ)["X509_USER_PROXY"], "/tmp/x509up_u1000")

    def test_payloads_get_nothing_the_pilot_scrubs(self) -> None:
        for name in ("GOOGLE_APPLICATION_CREDENTIALS", "_CONDOR_CREDS", "S3_ACCESS_KEY", "PANDA_AUTH_DIR"):
            self.assertTrue(is_denied(name), name)
        self.assertFalse(is_denied("X509_CERT_DIR"))
        self.assertFalse(is_denied("PATH"))

"""Which process role runs in which container runtime (queue ``container_type``, job image)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.container.select import job_image, parse_container_type, runtime_for
from pilot.model.job import Job, parse_job
from pilot.queuedata import QueueData


def job(**extra: Any) -> Job:
    return parse_job({"PandaID": 1, "transformation": "t", **extra})


def queue(container_type: str) -> QueueData:
    return QueueData.from_dict({"nickname": "Q", "container_type": container_type}, "Q")


class ContainerTypeTests(SynchronousTestCase):
    def test_cric_words(self) -> None:
        self.assertEqual(
            parse_container_type("singularity:pilot;docker:wrapper;bwrap:middleware"),
            {"payload": "apptainer", "stagein": "bubblewrap", "stageout": "bubblewrap"},
        )

    def test_roles_and_all(self) -> None:
        mapping = parse_container_type("bubblewrap:all; apptainer:payload")
        self.assertEqual(mapping["payload"], "apptainer", "later entries win")
        self.assertEqual(mapping["utility"], "bubblewrap")
        self.assertEqual(parse_container_type(""), {})
        self.assertEqual(
            parse_container_type("podman:payload;apptainer:nonsense"), {}, "unknown words ignored"
        )

    def test_job_image(self) -> None:
        self.assertEqual(
            job_image(job(jobPars="--containerImage docker://alpine:3 -c 'x'")), "docker://alpine:3"
        )
        self.assertEqual(job_image(job(jobPars="--containerImage=/cvmfs/img.sif")), "/cvmfs/img.sif")
        self.assertEqual(job_image(job(container_name="docker://busybox")), "docker://busybox")
        self.assertIsNone(job_image(job(jobPars="-c 'echo hi'")))

    def test_job_image_is_found_once_when_the_job_arrives(self) -> None:
        """Defect 2: ``job_image`` ran ``shlex.split`` over the whole jobPars, for every process."""
        parsed = job(jobPars="--containerImage docker://alpine:3 " + "\\a" * 50_000)
        self.assertEqual(parsed.container_image, "docker://alpine:3")
        later = replace(parsed, job_pars="--containerImage docker://other")
        self.assertEqual(job_image(later), "docker://alpine:3", "no second look at the parameters")
        self.assertEqual(runtime_for("payload", later, queue("")), "apptainer")

    def test_runtime_for(self) -> None:
        self.assertEqual(runtime_for("payload", job(), queue("bubblewrap:payload")), "bubblewrap")
        self.assertIsNone(runtime_for("stagein", job(), queue("bubblewrap:payload")))
        self.assertEqual(runtime_for("payload", job(container_name="docker://x"), queue("")), "apptainer")
        self.assertIsNone(runtime_for("payload", job(), queue("")))


class CatchallOptionsTests(SynchronousTestCase):
    def test_container_options_from_catchall(self) -> None:
        def options(**raw: Any) -> str:
            return QueueData.from_dict({"nickname": "Q", **raw}, "Q").container_options

        self.assertEqual(
            options(catchall="x=1 apptainer_options='-B /scratch --contain' y"), "-B /scratch --contain"
        )
        self.assertEqual(options(catchall='singularity_options="-c -i"'), "-c -i")
        self.assertEqual(options(catchall="singularity_options=-c"), "-c")
        self.assertEqual(options(catchall="apptainer_options='-c'", container_options="-B /a"), "-B /a")
        self.assertEqual(options(catchall="nothing here"), "")


class CopytoolBindTests(SynchronousTestCase):
    def test_binds_for_a_copytool_command(self) -> None:
        from pilot.container.spec import Bind
        from pilot.job.launcher import binds_for

        base = Path(self.mktemp()).absolute()
        workdir, storage, venv = base / "work", base / "storage", base / "venv"
        for directory in (workdir, storage / "in", venv / "bin"):
            directory.mkdir(parents=True)
        (storage / "in" / "a.root").write_text("x")
        (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
        (venv / "bin" / "python").write_text("")
        proxy = base / "x509up"
        proxy.write_text("pem")
        argv = [str(venv / "bin" / "python"), "/usr/bin/cp", str(storage / "in" / "a.root"),
                str(workdir / "a.root"), str(storage / "out" / "b.root"), "root://host//x"]  # fmt: skip
        (storage / "out").mkdir()
        binds = binds_for(argv, {"X509_USER_PROXY": str(proxy), "PATH": "/usr/bin:/bin"}, workdir)
        self.assertEqual(
            binds,
            [
                Bind(venv, venv, read_only=True),
                Bind(storage / "in" / "a.root", storage / "in" / "a.root", read_only=True),
                Bind(storage / "out", storage / "out", read_only=False),
                Bind(proxy, proxy, read_only=True),
            ],
        )

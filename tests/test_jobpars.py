"""The job parameters: the size limit of the payload command, ``--containerImage`` taken out,
and a word splitter that agrees with ``shlex`` in linear time."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pilot.errorcodes import ErrorCode
from pilot.experiments.generic import GenericExperiment
from pilot.model.job import JobDefinitionError, parse_job
from pilot.model.jobpars import (
    COMMAND_HEADROOM,
    MAX_ARG_STRLEN,
    MAX_COMMAND_BYTES,
    MAX_TRANSFORMATION_BYTES,
    shell_words,
    split_parameters,
)

reactor: Any = _reactor


def job(**extra: Any) -> dict[str, Any]:
    return {"PandaID": 5, "transformation": "/bin/bash", **extra}


def rejected(raw: dict[str, Any]) -> JobDefinitionError:
    try:
        parse_job(raw)
    except JobDefinitionError as error:
        return error
    raise AssertionError(f"accepted: {raw!r:.200}")


def python_steps(function: Callable[[], object]) -> int:
    """How many Python lines run while ``function`` runs (any module): a step count, not a clock.

    A scan in Python, like ``shlex``'s character loop, shows here as steps per character.
    """
    count = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        function()
    finally:
        sys.settrace(previous)
    return count


class SizeLimitTests(SynchronousTestCase):
    """Defect 2: a 10 MB ``jobPars`` froze the pilot, then failed as a payload failure."""

    def test_huge_parameters_are_a_definition_error_naming_size_and_limit(self) -> None:
        job_pars = "-c 'x" + "y" * 10 * 1024 * 1024 + "'"
        error = rejected(job(jobPars=job_pars))
        self.assertEqual((error.code, error.field), (ErrorCode.CONVERSIONFAILURE, "jobPars"))
        self.assertIn(f" {len('/bin/bash ' + job_pars)} bytes", error.diag, "the size")
        self.assertIn(str(MAX_COMMAND_BYTES), error.diag, "the limit")
        self.assertIn(str(MAX_ARG_STRLEN), error.diag, "why")

    def test_huge_parameters_are_refused_before_being_read(self) -> None:
        steps = python_steps(
            lambda: self.assertRaises(JobDefinitionError, parse_job, job(jobPars="'" * 2**20))
        )
        self.assertLess(steps, 200, "no scan of a text that cannot run")

    def test_the_limit_counts_bytes_of_the_whole_command(self) -> None:
        trf = "/opt/t"
        room = MAX_COMMAND_BYTES - len(trf) - 1
        self.assertEqual(parse_job(job(transformation=trf, jobPars="x" * room)).job_pars, "x" * room)
        error = rejected(job(transformation=trf, jobPars="x" * (room + 1)))
        self.assertEqual(error.field, "jobPars")
        self.assertEqual(rejected(job(transformation=trf, jobPars="é" * (room // 2 + 1))).field, "jobPars")
        quoted = "/opt/it's"  # the generic experiment quotes it: /opt/it'"'"'s
        self.assertEqual(rejected(job(transformation=quoted, jobPars="x" * (room - 3))).field, "jobPars")

    def test_transformation_is_at_most_a_path(self) -> None:
        error = rejected(job(transformation="/" + "t" * MAX_TRANSFORMATION_BYTES))
        self.assertEqual((error.code, error.field), (ErrorCode.CONVERSIONFAILURE, "transformation"))
        self.assertIn(str(MAX_TRANSFORMATION_BYTES), error.diag)


class RealCommandLineTests(TestCase):
    """The limit is the kernel's: the largest command accepted runs, with a full prefix."""

    timeout = 30

    async def test_largest_accepted_command_runs_with_its_prefix(self) -> None:
        trf = "/bin/bash"
        filler = MAX_COMMAND_BYTES - len(trf) - 1 - len("-c ': '")
        parsed = parse_job(job(transformation=trf, jobPars=f"-c ': {'x' * filler}'"))
        command = GenericExperiment().payload_command(parsed, trf, Path("."))
        self.assertEqual(len(command.encode()), MAX_COMMAND_BYTES)
        prefix = ":" + " " * (COMMAND_HEADROOM - 2) + ";"
        out, err, code = await getProcessOutputAndValue(
            "/bin/bash", ["-c", prefix + command], env={}, reactor=reactor
        )
        self.assertEqual(code, 0, err)
        with self.assertRaises(OSError) as raised:
            await getProcessOutputAndValue(
                "/bin/bash", ["-c", prefix + command + " "], env={}, reactor=reactor
            )
        self.assertEqual(raised.exception.errno, 7, "E2BIG: one byte more than MAX_ARG_STRLEN allows")

    async def test_payload_command_runs_without_the_container_option(self) -> None:
        """Defect 9: bash got ``--containerImage`` ("invalid option", exit 2)."""
        parsed = parse_job(job(jobPars="--containerImage docker://alpine:3 -c 'echo hi'"))
        command = GenericExperiment().payload_command(parsed, parsed.transformation, Path("."))
        out, err, code = await getProcessOutputAndValue("/bin/bash", ["-c", command], env={}, reactor=reactor)
        self.assertEqual((out, code), (b"hi\n", 0), err)


class ContainerImageOptionTests(SynchronousTestCase):
    """Defect 9: ``--containerImage`` reached bash; a host-root image was accepted."""

    def test_option_is_taken_out_of_the_payload_arguments(self) -> None:
        cases = {
            "--containerImage docker://alpine:3 -c 'echo hi'": ("-c 'echo hi'", "docker://alpine:3"),
            "-c 'echo hi' --containerImage=/cvmfs/img.sif": ("-c 'echo hi' ", "/cvmfs/img.sif"),
            "a  --containerImage 'docker://x y'\tb\nc": ("a  b\nc", "docker://x y"),
            "x\\  --containerImage i": ("x\\  ", "i"),
            "-c 'run --containerImage inside quotes'": ("-c 'run --containerImage inside quotes'", None),
            "--containerImage i --containerImage=i z": ("z", "i"),
        }
        for text, (args, image) in cases.items():
            split = split_parameters(text)
            self.assertEqual((split.payload_args, split.image), (args, image), text)
            parsed = parse_job(job(jobPars=text))
            self.assertEqual((parsed.payload_args, parsed.container_image), (args, image), text)

    def test_generic_payload_command_has_no_container_option(self) -> None:
        parsed = parse_job(job(jobPars="--containerImage docker://alpine:3 -c 'echo hi'"))
        command = GenericExperiment().payload_command(parsed, "/bin/bash", Path("."))
        self.assertEqual(command, "/bin/bash -c 'echo hi'")
        self.assertEqual(parsed.job_pars, "--containerImage docker://alpine:3 -c 'echo hi'", "kept as sent")

    def test_image_from_container_name(self) -> None:
        self.assertEqual(
            parse_job(job(container_name="docker://busybox")).container_image, "docker://busybox"
        )
        self.assertEqual(
            parse_job(
                job(container_name="docker://b", jobPars="--containerImage=docker://a")
            ).container_image,
            "docker://a",
            "the parameters win",
        )
        self.assertIsNone(parse_job(job(container_name="NULL")).container_image)

    def test_host_root_and_escapes_are_refused(self) -> None:
        for image in ("/", "/.", "//", "///", "/usr/..", "/./usr/../.", "/proc/1/root", "/proc/self/cwd", "../..",
                      "a/../../b"):  # fmt: skip
            for raw, field in ((job(jobPars=f"--containerImage {image} x"), "jobPars"),
                               (job(container_name=image), "container_name")):  # fmt: skip
                error = rejected(raw)
                self.assertEqual((error.code, error.field), (ErrorCode.IMAGENOTFOUND, field), image)
        for image in ("/cvmfs/unpacked.cern.ch/x", "img.sif", "./img.sif", "docker://alpine", "oras://r/i:1"):
            self.assertEqual(parse_job(job(container_name=image)).container_image, image)

    def test_malformed_options(self) -> None:
        for text in ("x --containerImage", "--containerImage= x", "--containerImage a --containerImage b"):
            self.assertEqual(rejected(job(jobPars=text)).code, ErrorCode.CONVERSIONFAILURE, text)
        self.assertEqual(rejected(job(jobPars="--containerImage -v")).code, ErrorCode.IMAGENOTFOUND)


SHELL_TEXT = st.text(alphabet="ab -=\t\n'\"\\", max_size=60)
#: Quoting that makes ``shlex`` slow: one long word of escapes and alternating quotes.
PATHOLOGICAL = st.one_of(
    st.sampled_from(
        ["\\a", "'a'", '"a"', "'a'\"b\"", '"\\"', "\\'", "a", "\\\\", "a ", "--containerImage=docker://i "]
    ),
    st.text(alphabet="'\"\\a ", min_size=1, max_size=6),
)


OPTION_TOKENS = st.sampled_from(
    ["--containerImage", "--containerImage=img", "'--containerImage'", '--contain"erImage"', "--containerImage=",
     "img", "'a b'", "\\ ", "-c", 'x"y"', "\t", "", "--containerImages", "'--containerImage=img'"]
)  # fmt: skip


class ShellWordsTests(SynchronousTestCase):
    @given(SHELL_TEXT)
    def test_agrees_with_shlex(self, text: str) -> None:
        words = list(shell_words(text))
        try:
            expected = shlex.split(text)
        except ValueError:  # unclosed quote or final backslash: the last word runs to the end
            self.assertEqual(words[-1].end if words else len(text), len(text))
            return
        self.assertEqual([w.value for w in words], expected)
        for word in words:
            self.assertEqual(shlex.split(text[word.start : word.end]), [word.value])

    @given(st.lists(OPTION_TOKENS, max_size=8))
    def test_option_found_as_in_shlex_words(self, tokens: list[str]) -> None:
        text = " ".join(tokens)
        words = shlex.split(text)
        image: str | None = None
        rest: list[str] = []
        index = 0
        try:
            while index < len(words):
                word = words[index]
                if word == "--containerImage" or word.startswith("--containerImage="):
                    if word == "--containerImage":
                        if index + 1 == len(words):
                            raise ValueError("no value")
                        found, index = words[index + 1], index + 2
                    else:
                        found, index = word.partition("=")[2], index + 1
                    if not found or found.startswith("-") or (image is not None and found != image):
                        raise ValueError("bad value")
                    image = found
                else:
                    rest.append(word)
                    index += 1
        except ValueError:
            self.assertRaises(JobDefinitionError, split_parameters, text)
            return
        split = split_parameters(text)
        self.assertEqual((split.image, shlex.split(split.payload_args)), (image, rest))

    @settings(max_examples=12)
    @given(PATHOLOGICAL)
    def test_pathological_quoting_parses_in_linear_time(self, unit: str) -> None:
        """120 kB that make ``shlex`` quadratic: counted steps, and two sizes' times compared."""

        def raw(size: int) -> dict[str, Any]:
            return job(jobPars="--containerImage docker://i " + unit * (size // len(unit)))

        def steps(size: int) -> int:
            definition = raw(size)
            return python_steps(lambda: self.assertEqual(parse_job(definition).container_image, "docker://i"))

        def seconds(size: int) -> float:
            definition = raw(size)
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                parse_job(definition)
                best = min(best, time.perf_counter() - started)
            return best

        small, large = steps(30_000), steps(120_000)
        self.assertLess(large, 5 * small, "4 times the text, at most about 4 times the steps")
        self.assertLess(large, 2 * 120_000, "not a loop over characters (shlex: 16 steps per character)")
        # the regular expressions do the scanning: one that backtracks shows in time, not in steps
        ratio = seconds(120_000) / max(seconds(15_000), 1e-6)
        self.assertLess(ratio, 24, "8 times the text: about 8 times the time (quadratic: 64)")

"""start-uploader.sh: local mode with uv, container mode with the public uv image."""

import os
import subprocess

from tests.helpers import ROOT, TempDirTestCase

LAUNCHER = os.path.join(ROOT, "start-uploader.sh")


class LauncherTest(TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.bin = self.path("bin")
        os.makedirs(self.bin)
        self.config = self.path("uploader.yaml")
        with open(self.config, "w") as fh:
            fh.write("sqlite: /data/sensor_data.db\n")

    def fake(self, name):
        """A stand-in program that records its arguments, one per line."""
        path = os.path.join(self.bin, name)
        with open(path, "w") as fh:
            fh.write(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{self.path(name + ".args")}"\n')
        os.chmod(path, 0o755)

    def run_launcher(self, *args, **env):
        full = {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": self.tmp, **env}
        return subprocess.run(["bash", LAUNCHER, *args], env=full, cwd=self.tmp,
                              capture_output=True, text=True, timeout=30)

    def args_of(self, name):
        with open(self.path(name + ".args")) as fh:
            return fh.read().splitlines()

    def test_local_mode_execs_uv_run_with_the_config(self):
        self.fake("uv")
        result = self.run_launcher(self.config, "--once")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.args_of("uv"), [
            "run", "--quiet", "--script", os.path.join(ROOT, "sqlite_to_databricks_uploader.py"),
            "--config", self.config, "--once"])

    def test_missing_uv_says_how_to_get_it(self):
        result = self.run_launcher(self.config)
        self.assertEqual(result.returncode, 2)
        self.assertIn("pip install uv", result.stderr)

    def test_missing_config_is_one_line(self):
        self.fake("uv")
        result = self.run_launcher("nope.yaml")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1)

    def test_container_mode_mounts_read_only_and_keeps_secrets_off_the_command(self):
        self.fake("docker")
        os.makedirs(self.path("data"))
        result = self.run_launcher("--container", self.config, "--once",
                                   SOURCE_ID="edge-7", DATABRICKS_TOKEN="dapiSECRET")
        self.assertEqual(result.returncode, 0, result.stderr)
        args = self.args_of("docker")
        self.assertEqual(args[:2], ["run", "--rm"])
        mounts = [args[i + 1] for i, a in enumerate(args) if a == "-v"]
        self.assertIn(f"{self.path('data')}:/data:ro", mounts)
        self.assertIn(f"{self.config}:/app/uploader-config.yaml:ro", mounts)
        self.assertIn(f"{self.path('state')}:/state", mounts)
        self.assertTrue(any(m.endswith(":/app/sqlite_to_databricks_uploader.py:ro")
                            for m in mounts))
        self.assertIn("DATABRICKS_TOKEN", args)
        self.assertNotIn("dapiSECRET", " ".join(args))
        self.assertTrue(any(a.startswith("ghcr.io/astral-sh/uv:") for a in args))
        self.assertEqual(args[-3:], ["--config", "/app/uploader-config.yaml", "--once"])

    def test_container_mode_needs_a_source_id(self):
        self.fake("docker")
        os.makedirs(self.path("data"))
        result = self.run_launcher("--container", self.config)
        self.assertEqual(result.returncode, 2)
        self.assertIn("SOURCE_ID", result.stderr)

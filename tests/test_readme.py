"""README.md stays true to the parser: every setting in its table, the commands CI runs."""

import os
import re
import unittest

from tests.helpers import ROOT, up


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        return fh.read()


class ReadmeTest(unittest.TestCase):
    def test_configuration_table_lists_every_setting_with_its_names(self):
        rows = {}
        for line in readme().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 4 and cells[0].startswith("`"):
                rows[re.match(r"`([a-z_]+)`", cells[0]).group(1)] = cells
        for name, setting, _ in up.config_fields():
            with self.subTest(setting=name):
                self.assertIn(name, rows, f"{name} missing from the README table")
                key, flag, env, _default = rows[name]
                self.assertEqual(flag, f"`{setting.flag}`")
                self.assertEqual(env, f"`{setting.env[0]}`")
                for alias in setting.yaml_aliases:
                    self.assertIn(f"`{alias}`", key)
        self.assertEqual(set(rows) - {n for n, _, _ in up.config_fields()}, set())

    def test_the_two_setup_commands_are_there(self):
        text = readme()
        self.assertIn("\nuv run sqlite_to_databricks_uploader.py --demo\n", text)
        with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as fh:
            pattern = re.search(r"grep -m1 -E '([^']+)' README.md", fh.read()).group(1)
        full = [l for l in text.splitlines() if re.match(pattern, l)]
        self.assertEqual(len(full), 1, "exactly one full test command, which .ci/run runs")
        self.assertTrue(full[0].startswith("UPLOADER_FULL_TESTS=1 "), full[0])
        # the quick one is the same command without the slow suites
        quick = full[0].replace("UPLOADER_FULL_TESTS=1 ", "").replace(" -v", "")
        self.assertIn("\n" + quick + "\n", text)

    def test_every_action_flag_is_documented(self):
        text = readme()
        parser = up.build_parser()
        for action in parser._action_groups:
            if action.title != "actions":
                continue
            for option in action._group_actions:
                flag = option.option_strings[-1]
                with self.subTest(flag=flag):
                    self.assertIn(flag, text)

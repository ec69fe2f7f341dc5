"""Ablation experiments: a YAML sweep over recipes and overrides, run by a registered study,
resumable, with results as JSONL, CSV, a markdown table and a plot.

`studies` holds the run config, the study registry and the built-in `efficiency` study;
`runner` holds the experiment config, its expansion into runs and the resumable runner.
"""

from mixerzoo.ablate.studies import (
    RunConfig, Study, StudySettings, build_spec, get_study, list_studies, register_study, study_settings,
)

__all__ = ["RunConfig", "Study", "StudySettings", "build_spec", "get_study", "list_studies", "register_study",
           "study_settings"]

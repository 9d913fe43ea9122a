"""Typed configuration of the agent graph (section ``agents`` of the config tree).

Every field states its unit and scope. ``synthmed generate`` reads this section; its flags
(``--n``, ``--seed``, ``--max-rounds``) override the matching fields for one call.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LLMConfig(Section):
    """An OpenAI-compatible chat model per reasoning stage (``reasoner: llm``); the rules remain the fallback."""

    model: str = ""  # model name the server knows, e.g. "llama-3.1-8b-instruct"; empty: no LLM configured
    base_url: str = "http://localhost:8000/v1"  # OpenAI-compatible endpoint (a local server; nothing leaves the machine unless you point it elsewhere)
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key; local servers accept any value
    temperature: float = Field(0.0, ge=0, le=2)  # 0: the same answer for the same request
    timeout_s: float = Field(60.0, gt=0)  # seconds per call before the stage falls back to the rules
    stages: list[Literal["parse_request", "localize_anatomy", "assess_pathology", "map_visual_features"]] = [
        "parse_request", "localize_anatomy", "assess_pathology", "map_visual_features"]  # stages the LLM runs; others use the rules


class VerifierConfig(Section):
    """How the verifier agent turns its tools' readings into a verdict (never with the held-out evaluator)."""

    # the finding classifiers it judges with: "verifier", its own (trained apart from the reward's, in seed, split and
    # widths: rlhf.classifiers), so that an image drawn with reward guidance, or by an adapter the reward trained, is not
    # judged by the network it was pushed towards; "reward": the reward's own (the only choice before 2026-12-05). The loop's
    # stage 2 reads the same role for its verifier pass.
    role: Literal["verifier", "reward"] = "verifier"
    # calibrated probability from which a requested finding counts as shown, and below which a negated one counts as absent;
    # null: each label's operating point, fit with the classifier of `role` (its config.json "thresholds"; 0.5 where it has none)
    present_threshold: float | None = Field(None, ge=0, le=1)
    absent_threshold: float | None = Field(None, ge=0, le=1)
    min_alignment: float | None = Field(None, ge=-1, le=1)  # CLIP cosine below which a candidate fails; None: alignment ranks, never fails
    use_alignment: bool = True  # load the alignment model (rlhf/weights/clip) as a tool
    use_memorisation: bool = True  # compare with the generator's training images when they are on disk
    # manifests of the generator's training images, first found per modality wins: the default model's own 64 px set, else
    # the same studies drawn at 128 px by the main command (resized for the check)
    training_data: list[str] = ["data/phantoms_64px/manifest.csv", "data/phantoms/manifest.csv"]
    training_limit: int = Field(2000, ge=1)  # training images per modality held for the memorisation check
    memorisation_threshold: float = Field(0.95, gt=0, le=1)  # pixel SSIM to the nearest training image above which a candidate is a copy
    memorisation_size: int = Field(32, ge=8)  # pixels per side both images are reduced to for that comparison
    alignment_weight: float = Field(0.25, ge=0)  # weight of the CLIP cosine in a candidate's ranking score, next to finding agreement (1)


class RefineConfig(Section):
    """What a refinement round may change."""

    guidance_step: float = Field(1.5, ge=0)  # added to the guidance scale when a requested finding is not shown
    max_guidance: float = Field(9.0, ge=1)  # upper bound of the guidance scale
    min_guidance: float = Field(2.0, ge=1)  # lower bound (saturated candidates lower the scale)
    escalate_severity: bool = True  # a missing finding whose severity the user left open is restated one grade more severe
    normal_as_negative: bool = True  # a missing finding puts the modality's normal report into the negative prompt


class AgentsConfig(Section):
    reasoner: Literal["rules", "llm"] = "rules"  # rules: deterministic, offline; llm: the chat model in `llm`, rules as fallback
    llm: LLMConfig = Field(default_factory=LLMConfig)
    candidates: int = Field(4, ge=1)  # images drawn per round; the verifier keeps the best
    max_rounds: int = Field(3, ge=1)  # generate-verify rounds in all (1: no refinement)
    seed: int = Field(0, ge=0)  # seed of the first candidate; each candidate and round draws a new one
    steps: int | None = Field(None, ge=1)  # denoising steps; None: sample.steps
    guidance: float | None = Field(None, ge=0)  # first round's guidance scale; None: sample.guidance
    max_chars: int = Field(2000, ge=50)  # request characters read; longer text is truncated (reported in the trace)
    retrieval_k: int = Field(8, ge=1)  # hits per retrieval query
    contradiction: Literal["refuse", "prefer_findings"] = "refuse"  # "normal study" with findings: refuse, or drop the normal statement
    non_drawable: Literal["warn", "refuse"] = "warn"  # a valid finding the generator never learnt: a warning in the verdict, or an error
    default_severity: Literal["mild", "moderate", "severe"] | None = "moderate"  # severity assumed where the user gives none and the finding has grades
    # > 0: every candidate is drawn with reward guidance at this scale (rlhf.guidance: DDIM, eta 0; each step's predicted
    # image moves towards what the request states, by the gradient of the reward-role classifiers; 0.1 is the loop's
    # measured setting, docs/improve/long_runs.md). The verifier judges them with its own classifiers (verifier.role); with
    # verifier.role "reward" it judges images drawn towards its own network and its pass is no longer independent evidence
    # (the trace says so). The held-out evaluator never guides. 0: off.
    reward_guidance: float = Field(0.0, ge=0)
    reward_guidance_views: int = Field(4, ge=1)  # jittered views the guiding likelihood is averaged over
    traces: str = "runs/traces.sqlite"  # SQLite checkpointer: every step of every request (`synthmed trace`)
    out: str = "runs/generate"  # images of `synthmed generate`, one folder per trace id
    verifier: VerifierConfig = Field(default_factory=VerifierConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)


__all__ = ["AgentsConfig", "LLMConfig", "RefineConfig", "VerifierConfig"]

"""Model licences and what they require of a merge: which licence a derivative may carry, and why.

The rules are a summary to help people notice problems, not legal advice; anything sdbuild does not know is
reported as unknown, never guessed. A licence's `allows` is the set of licences a derivative of it may be
released under (None: any, as with permissive licences); a card licence outside an ingredient's set is a
conflict, and so is a pair of ingredients whose sets do not meet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

OPENRAIL_FAMILY = frozenset({"creativeml-openrail-m", "openrail++", "fair-ai-public-license-1.0-sd"})


@dataclass(frozen=True)
class Licence:
    id: str
    name: str
    url: str
    hf: str  # Hugging Face's identifier, or "other" (then the card adds license_name and license_link)
    rule: str  # what it requires of a derivative, in one sentence
    allows: frozenset[str] | None  # licences a derivative may carry; None: any


KNOWN: dict[str, Licence] = {lic.id: lic for lic in (
    Licence("creativeml-openrail-m", "CreativeML Open RAIL-M", "https://huggingface.co/spaces/CompVis/stable-diffusion-license",
            "creativeml-openrail-m", "its use restrictions (Attachment A) carry forward: a derivative must be released under "
            "a licence that includes them", OPENRAIL_FAMILY),
    Licence("openrail++", "CreativeML Open RAIL++-M", "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md",
            "openrail++", "its use restrictions carry forward: a derivative must be released under a licence that includes them",
            OPENRAIL_FAMILY),
    Licence("fair-ai-public-license-1.0-sd", "Fair AI Public License 1.0-SD", "https://freedevproject.org/faipl-1.0-sd/",
            "other", "derivatives must be shared under the same licence (and their source made available)",
            frozenset({"fair-ai-public-license-1.0-sd"})),
    Licence("flux-1-dev-non-commercial-license", "FLUX.1 [dev] Non-Commercial License",
            "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md", "other",
            "non-commercial use only; derivatives must be distributed under the same licence",
            frozenset({"flux-1-dev-non-commercial-license"})),
    Licence("apache-2.0", "Apache License 2.0", "https://www.apache.org/licenses/LICENSE-2.0", "apache-2.0",
            "permissive: a derivative may carry any licence, keeping the copyright and licence notices", None),
    Licence("stabilityai-ai-community", "Stability AI Community License",
            "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/blob/main/LICENSE.md", "other",
            "derivatives must be distributed under the same licence, with its notice and its revenue limit on commercial use",
            frozenset({"stabilityai-ai-community"})),
)}

ALIASES = {"openrail-m": "creativeml-openrail-m", "creativeml-openrail": "creativeml-openrail-m", "openrail++-m": "openrail++",
           "creativeml-openrail++-m": "openrail++", "faipl-1.0-sd": "fair-ai-public-license-1.0-sd",
           "flux-1-dev-non-commercial": "flux-1-dev-non-commercial-license", "flux-dev-non-commercial-license": "flux-1-dev-non-commercial-license",
           "apache-2": "apache-2.0", "apache2": "apache-2.0", "stability-ai-community": "stabilityai-ai-community",
           "stabilityai-community": "stabilityai-ai-community"}
# when several licences satisfy every ingredient and none is declared, the result is the first of these that fits
PREFERENCE = ("fair-ai-public-license-1.0-sd", "flux-1-dev-non-commercial-license", "stabilityai-ai-community",
              "creativeml-openrail-m", "openrail++", "apache-2.0")
NOT_LEGAL_ADVICE = "This is a summary of the licences' terms to help you check a release; it is not legal advice."


def normalise(text: str | None) -> str | None:
    """A known licence id for some spelling of it, or None."""
    if not text:
        return None
    key = re.sub(r"[\s_]+", "-", str(text).strip().lower())
    key = ALIASES.get(key, key)
    return key if key in KNOWN else None


@dataclass(frozen=True)
class Holder:
    """One ingredient as far as licences go: a label for messages and the licence text it records (or None)."""

    label: str
    licence: str | None


@dataclass
class Verdict:
    result: str  # a licence id, the declared text, "unknown" or "conflict"
    declared: str | None
    why: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def conflicts(self) -> bool:
        return bool(self.warnings)


def describe(text: str | None) -> str:
    """How an ingredient's licence is listed: its id when known, else `unknown` (with what it says)."""
    lid = normalise(text)
    if lid:
        return lid
    return f"unknown ({text})" if text else "unknown"


def assess(declared: str | None, holders: Iterable[Holder]) -> Verdict:
    """The licence a merge may carry given its ingredients', and a warning for every contradiction."""
    holders = list(holders)
    verdict = Verdict(result="unknown", declared=declared)
    known = [(h, KNOWN[lid]) for h in holders if (lid := normalise(h.licence))]
    unknown = [h for h in holders if not normalise(h.licence)]
    for h, lic in known:
        verdict.why.append(f"{h.label}: {lic.id}: {lic.rule}.")
    for h in unknown:
        verdict.why.append(f"{h.label}: licence unknown{f' ({h.licence!r} is not one sdbuild knows)' if h.licence else ''}; "
                           "check its terms yourself.")
    # ingredients whose licences cannot meet
    reported: set[tuple[str, str]] = set()
    for i, (h1, l1) in enumerate(known):
        for h2, l2 in known[i + 1:]:
            if l1.id == l2.id or (l1.id, l2.id) in reported:
                continue
            if l1.allows is not None and l2.allows is not None and not (l1.allows & l2.allows):
                reported.add((l1.id, l2.id))
                verdict.warnings.append(f"ingredients {h1.label} ({l1.id}) and {h2.label} ({l2.id}) cannot be combined: "
                                        f"{l1.id} requires that {l1.rule}, and {l2.id} that {l2.rule}")
    if declared:
        did = normalise(declared)
        if did is None:
            verdict.result = declared
            verdict.why.insert(0, f"The card declares {declared!r}, which sdbuild does not know, so it is not checked against the ingredients.")
            return verdict
        verdict.result = did
        verdict.why.insert(0, f"The card declares {did}.")
        for h, lic in known:
            if lic.allows is not None and did not in lic.allows:
                verdict.warnings.append(f"card licence {did} contradicts {h.label}'s licence {lic.id}: {lic.rule}")
        return verdict
    if not holders:
        verdict.why.insert(0, "No ingredient records a licence and the card declares none.")
        return verdict
    if unknown:
        verdict.why.insert(0, "The card declares no licence, and some ingredients' licences are unknown, so the result is unknown.")
        return verdict
    allowed: set[str] | None = None
    for _, lic in known:
        if lic.allows is not None:
            allowed = set(lic.allows) if allowed is None else allowed & lic.allows
    ids = {lic.id for _, lic in known}
    if allowed is None:  # only permissive ingredients
        verdict.result = sorted(ids)[0]
    elif not allowed:
        verdict.result = "conflict"
        verdict.why.insert(0, "No licence satisfies every ingredient.")
        return verdict
    else:
        verdict.result = next(iter(ids)) if len(ids) == 1 and ids <= allowed else next(p for p in PREFERENCE if p in allowed)
    verdict.why.insert(0, f"The card declares no licence; {verdict.result} is the licence the ingredients' terms lead to.")
    return verdict

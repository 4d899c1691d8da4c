"""Client-side differential privacy: Flower's clipping mod, applied when the run asks clients to clip.

With `privacy.differential-privacy` = client-fixed or client-adaptive, each client clips the update
it sends (Flower's `fixedclipping_mod` / `adaptiveclipping_mod`); the server noises the mean
(server/privacy.py). The mod sits inside `adapters.send_update_mod`, so it clips the float32 update.
"""

from __future__ import annotations

from logging import INFO

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log

from flowertune_llm.shared.settings import PrivacySettings, parse_config


def client_clipping_mod(settings: PrivacySettings):
    """Return Flower's clipping mod for client-side DP, or None when clients do not clip."""
    if not settings.client_side:
        return None
    return adaptiveclipping_mod if settings.adaptive else fixedclipping_mod


def clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: clip the update with Flower's clipping mod when the run uses client-side DP."""
    mod = client_clipping_mod(parse_config(context.run_config).privacy)
    if mod is None:
        return call_next(msg, context)
    log(INFO, "Clipping this client's update (%s)", mod.__name__)
    return mod(msg, context, call_next)

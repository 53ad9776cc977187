"""Typed, shared constants: topic layout, schema versions, limits and defaults.

Everything both sides must agree on lives here, so that a change is made once. The MQTT topic layout
is documented for operators in ``docs/mqtt.md``; keep the two in step.
"""

from __future__ import annotations

from typing import Final, Literal

# ---------------------------------------------------------------------------------------------
# Versions of the formats Bedside writes. A reader refuses a version it does not know.
# ---------------------------------------------------------------------------------------------
ENVELOPE_SCHEMA: Final = 1
MANIFEST_SCHEMA: Final = 1
INPUT_SCHEMA_VERSION: Final = 1
LEDGER_SCHEMA: Final = 2

# ---------------------------------------------------------------------------------------------
# Network defaults. Everything binds and connects to loopback unless configured otherwise.
# ---------------------------------------------------------------------------------------------
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_MQTT_PORT: Final = 1883
MQTT_KEEPALIVE_S: Final = 30

# ---------------------------------------------------------------------------------------------
# Limits. Decoders check these before they allocate.
# ---------------------------------------------------------------------------------------------
MAX_ENVELOPE_BYTES: Final = 64 * 1024 * 1024  # 64 MiB: ample for the small models Bedside targets
MAX_HEADER_BYTES: Final = 256 * 1024
MAX_TENSORS: Final = 4096
MAX_TENSOR_RANK: Final = 8
MAX_ID_LENGTH: Final = 64
NONCE_BYTES: Final = 16

# ---------------------------------------------------------------------------------------------
# MQTT topic layout. ``{fleet}`` separates independent federations on one broker.
#
#   bedside/v1/{fleet}/round            aggregator -> devices  QoS 1, retained  signed announcement
#   bedside/v1/{fleet}/model            aggregator -> devices  QoS 1, retained  signed model release
#   bedside/v1/{fleet}/update/{device}  device -> aggregator   QoS 1            signed update
#   bedside/v1/{fleet}/receipt/{device} aggregator -> device   QoS 1            signed receipt
#   bedside/v1/{fleet}/status/{device}  device -> anyone       QoS 1, retained  status (JSON)
#   bedside/v1/{fleet}/status/aggregator                       QoS 1, retained  round results (JSON)
#   bedside/v1/{fleet}/release/{device} aggregator -> device   QoS 1, retained  signed release
#                                                                               (targeted pushes)
#   bedside/v1/{fleet}/report/{device}  device -> aggregator   QoS 1            signed report on a
#                                                                               release
#   bedside/v1/{fleet}/key              aggregator -> devices  QoS 1, retained  key rotation
# ---------------------------------------------------------------------------------------------
TOPIC_ROOT: Final = "bedside/v1"
AGGREGATOR_ID: Final = "aggregator"
BROKER_ID: Final = "broker"
#: Identities of the services (certificate CNs, signers): never a device's id, so a device can
#: never borrow their broker identity or their place in an ACL (compared case-insensitively).
RESERVED_IDS: Final = frozenset({AGGREGATOR_ID, BROKER_ID, "ca", "downloads"})
#: ... and no device id starts with this: the aggregator's validator workers are
#: ``aggregator-worker-<id>`` at the broker.
RESERVED_PREFIX: Final = f"{AGGREGATOR_ID}-"


def topic_round(fleet: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/round"


def topic_model(fleet: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/model"


def topic_update(fleet: str, device_id: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/update/{device_id}"


def topic_updates_all(fleet: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/update/+"


def topic_receipt(fleet: str, device_id: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/receipt/{device_id}"


def topic_receipts_all(fleet: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/receipt/+"


def topic_status(fleet: str, who: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/status/{who}"


def topic_key(fleet: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/key"


def topic_release(fleet: str, device_id: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/release/{device_id}"


def topic_report(fleet: str, device_id: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/report/{device_id}"


def topic_reports_all(fleet: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/report/+"


def topic_status_all(fleet: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/status/+"


# ---------------------------------------------------------------------------------------------
# Envelope kinds.
# ---------------------------------------------------------------------------------------------
KIND_UPDATE: Final = "update"
KIND_MODEL: Final = "model"
KIND_ANNOUNCE: Final = "announce"
KIND_RECEIPT: Final = "receipt"
KIND_MANIFEST: Final = "manifest"
KIND_REPORT: Final = "report"  # a device's signed report on a model release
KIND_KEY: Final = "key"  # a key rotation statement, signed by the key it replaces
ENVELOPE_KINDS: Final = frozenset(
    {KIND_UPDATE, KIND_MODEL, KIND_ANNOUNCE, KIND_RECEIPT, KIND_MANIFEST, KIND_REPORT, KIND_KEY}
)

# ---------------------------------------------------------------------------------------------
# Privacy defaults.
# ---------------------------------------------------------------------------------------------
DEFAULT_DELTA: Final = 1e-5
UNIT_RECORD: Final = "record"
UNIT_DEVICE: Final = "device"
PRIVACY_UNITS: Final = (UNIT_RECORD, UNIT_DEVICE)
NOISE_CENTRAL: Final = "central"
NOISE_LOCAL: Final = "local"
NOISE_NONE: Final = "none"
#: Where device-level noise is added (docs/privacy.md).
NoiseMode = Literal["central", "local", "none"]
#: How the aggregator weights updates: equally, or by the (bucketed) record counts devices send.
Weighting = Literal["uniform", "examples"]
#: The optimizers a device may train with locally.
LocalOptimizer = Literal["sgd", "adam"]

# ---------------------------------------------------------------------------------------------
# ONNX model I/O names written by ``bedside models export``.
# ---------------------------------------------------------------------------------------------
ONNX_INPUT: Final = "features"
ONNX_OUTPUT: Final = "probabilities"
ONNX_OPSET: Final = 18
# Initializers of the input scaling inside an exported model (``BedsideNet.standardize``): the
# aggregator writes federated statistics into them without torch.
ONNX_LOC: Final = "standardize.loc"
ONNX_INV_SCALE: Final = "standardize.inv_scale"
MODEL_FILE: Final = "model.onnx"
MANIFEST_FILE: Final = "manifest.json"
QUANTIZED_FILE: Final = "model.int8.onnx"

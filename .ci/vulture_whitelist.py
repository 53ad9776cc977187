"""Names vulture cannot see used: called by a framework, or read as data. ``make lint`` runs
``vulture`` over the product code and the benchmarks with this file; anything else it reports is
dead code to delete (see docs/architecture.md)."""

# ruff: noqa
_ = object()

# torch calls nn.Module.forward; paho calls the callbacks assigned to its client.
_.forward
_.on_connect
_.on_disconnect
_.on_connect_fail
_.on_message
_.on_socket_open
# onnxruntime reads the session options set on it; numpy reads array flags.
_.intra_op_num_threads
_.inter_op_num_threads
_.execution_mode
_.enable_cpu_mem_arena
_.graph_optimization_level
_.log_severity_level
_.writeable
# Module protocol of bedside.privacy's lazy names.
__getattr__
__dir__
# Classes registered by name (bedside.federation.strategies) and built by make_rule/make_optimizer.
FedAvg
CoordinateMedian
TrimmedMean
ServerSGD
FedAvgM
FedAdam
# Fields of records that travel or are stored as data (JSON, TypedDict, dataclasses).
_.epsilon_rdp
_.epsilon_pld
_.closed_at
_.attempts
_.final_loss
_.seeded
# The in-memory broker's switch that tests use to take the network down (a test double).
_.set_up
# Flower loads the ServerApp and ClientApp by name (the app pyproject.toml components).
app
# Flower starts these by name through the scripts bedside.transport.flower.write_runtime writes.
serverapp_main
clientapp_main
# http.server calls these by name (the aggregator's download endpoint).
_.server_version
_.sys_version
_.do_GET
_.do_POST
_.log_message
_.daemon_threads
# urllib calls it by name (downloads refuse redirects).
_.redirect_request
# RunningSum.merge: partial sums kept apart (aggregator workers) are merged; tested in
# tests/unit/federation/test_aggregator_groups.py
_.merge
# paho calls it when a subscription is confirmed (benchmarks/federation.py)
_.on_subscribe

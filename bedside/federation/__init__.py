"""The round core: one round logic, torch-free and transport-free, that every driver shares.

* :mod:`~bedside.federation.settings`: what the data team configures (:class:`FederationSettings`)
  and what each round announces (:class:`RoundSettings`, ``to_meta``/``from_meta``);
* :mod:`~bedside.federation.validate`: the aggregator's checks on an update
  (:func:`open_update`, :func:`validate_update`);
* :mod:`~bedside.federation.aggregate`: closing a round (:func:`aggregate_round`: rule, central
  noise, server optimizer, adaptive clip norm);
* :mod:`~bedside.federation.strategies`: aggregation rules and server optimizers, registered by
  name;
* :mod:`~bedside.federation.device`: a device's side (:func:`plan_round`, :func:`privatize`);
* :mod:`~bedside.federation.report`: the device-level guarantee of what was released;
* :mod:`~bedside.federation.seeds`: where each round's randomness comes from.

Drivers (the MQTT agent and aggregator services, the in-process simulation, Flower) receive,
call these functions, persist and publish. Nothing here does I/O, imports torch or knows a
transport; see docs/architecture.md.
"""

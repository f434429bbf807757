"""The federation on Flower: client contract, apps, message protocol, schedule, runtime.

- `client`: `BaseClient`, the contract every client class implements, and loading classes by dotted path;
- `client_app`: the Flower ClientApp that builds the named client class on its partition and fits it;
- `server_app`: the Flower ServerApp main loop (map nodes to partitions, run the strategy, report rounds);
- `schedule`: who is malicious, when each attacker attacks, which clients a round samples (seeded);
- `rounds`: what happened on the client side of a round (for its metrics line);
- `runtime`: quiet environment, Ray start-up and resource checks, the watchdog, launching the simulation.

The strategies (server-side aggregation) are in the top-level `strategies` package, the client classes in
`clients`.
"""

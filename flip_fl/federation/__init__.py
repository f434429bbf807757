"""The federation on Flower: client contract, ClientApp, message protocol, server loop, runtime.

- `client`: `BaseClient`, the contract every client class implements, and loading classes by dotted path;
- `client_app`: the Flower ClientApp that builds the named client class on its partition and fits it;
- `loop`: the server loop (map nodes to partitions, rounds with timeouts and stops, checkpoints);
- `checkpoint`: what a resumed run continues from (global model, strategy and client state, RNG state);
- `observe`, `failures`: each reply reported as it arrives; failure reasons summarised one line each;
- `rounds`: what happened on the client side of a round (for its metrics line);
- `runtime`: quiet environment, local-only Ray start-up, resource checks, ending client actors, launching
  the simulation.

Who is malicious, when each attacker attacks and which clients a round samples is `flip_fl.schedule`.

The strategies (server-side aggregation) are in the top-level `strategies` package, the client classes in
`clients`.
"""

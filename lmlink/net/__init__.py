"""Networking: how a server is reached only over the tailnet, and how clients trust it.

Modules (each one job):
- `listeners`: listen mode -> bind addresses (`bind_hosts`), no-plaintext-off-box guard,
  /proc check that nothing listens on a wildcard.
- `localapi`: Tailscale LocalAPI via tslocal: `self_node`, `whois` -> Identity, `cert_pair`, `peers`.
- `relay`: the tailnet front door: accept, WhoIs (own bounded pool), refuse strangers and other
  local users, cap connections per peer, pipe TLS bytes to the inner servers; `PeerIdentities`
  maps `context.peer()` back to the caller.
- `inner`: the inner hop: the servers' unix sockets in a 0700 dir, one random name per relayed
  connection (so no local process can borrow a caller's identity).
- `httpserver`: uvicorn settings for every HTTP listener: head size cap and read timeout,
  concurrency limit, keep-alive timeout, mTLS, unix peer names.
- `peercred`: which local uid is behind a loopback connection (/proc, SO_PEERCRED).
- `tsnet`: embedded tailnet node (tailscale-py, Python >= 3.12, optional extra) feeding the relay.
- `tls`: server TLS material (tailnet cert or project CA), gRPC server credentials, client certs.
- `pinning`: client-side trust on first use; grpc trusts exactly the pinned leaf.
- `files`: 0700 directories and 0600 files for secrets.

Wiring for `lmlink serve --listen tailscaled` (tsnet is the same with `TsnetNode.serve`):

    api = LocalAPI(opts.localapi_socket)                      # $LMLINK_LOCALAPI_SOCKET / default
    hosts = bind_hosts("tailscaled", localapi=api)            # tailnet IPs only
    tls = server_tls(state_dir, [api.self_node().dns_name, *hosts], localapi=api)
    ids = PeerIdentities()
    gate = PolicyGate(ids.lookup, Policy(local_grants=shares))   # lmlink.access.gate
    hop = InnerHop(private_tmp_dir / "inner")                  # 0700
    grpc_server.add_secure_port(hop.grpc_target, server_credentials(tls))
    relay = Relay(hop.grpc_path, WhoIsPool(api.whois), ids)
    await relay.listen(hosts, opts.grpc_port)                 # the public (tailnet) port

In `local` mode no relay is needed: bind `bind_hosts("local")` directly; plaintext is allowed
there only (`assert_plaintext_allowed`).
"""

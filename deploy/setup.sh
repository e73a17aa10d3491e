#!/bin/sh
# One-shot setup: admin key pair and token, the token signer's key and certificate, the KBS's
# TLS pair. Writes files into $KEYS (default /keys); prints their names, never their contents.
set -eu
KEYS=${KEYS:-/keys}
umask 077
[ -f "$KEYS/admin-key.pem" ] || kbs-client admin keygen \
    --private-key "$KEYS/admin-key.pem" --public-key "$KEYS/admin-key.pub.pem"
kbs-client admin token --key "$KEYS/admin-key.pem" --role admin --issuer keybroker-setup \
    --ttl 7d --out "$KEYS/admin-token" --force
[ -f "$KEYS/token-signer.key" ] || kbs self-signed-cert --name keybroker-token-signer \
    --key-out "$KEYS/token-signer.key" --cert-out "$KEYS/token-signer.pem" --days 365
[ -f "$KEYS/tls.key" ] || kbs self-signed-cert --name kbs --name localhost --name 127.0.0.1 \
    --key-out "$KEYS/tls.key" --cert-out "$KEYS/tls.pem" --days 365
chmod 0644 "$KEYS/admin-key.pub.pem" "$KEYS/token-signer.pem" "$KEYS/tls.pem"
echo "setup done: keys and tokens in $KEYS"

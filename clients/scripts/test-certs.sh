#!/usr/bin/env bash
# Throwaway TLS material for the clients' TLS tests, made with the openssl CLI:
#
#   clients/scripts/test-certs.sh DIR
#
# writes into DIR: ca.pem (a test CA), server.pem / server.key (for localhost
# and 127.0.0.1), client.pem / client.key (CN "agent.example", for mutual
# TLS), and other-ca.pem (a CA that signed nothing here). EC P-256 keys, valid
# for one day. Used by the Python, TypeScript and Go suites.
set -euo pipefail
DIR=${1:?usage: test-certs.sh DIR}
mkdir -p "$DIR"
cd "$DIR"
cat > openssl.cnf <<'CNF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = backstop-test-ca
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = DNS:agent.example
authorityKeyIdentifier = keyid
CNF
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ca() { # name
  key "$1.key"
  openssl req -new -x509 -config openssl.cnf -extensions ca -key "$1.key" -days 1 \
    -subj "/CN=backstop-test-$1" -out "$1.pem"
}
leaf() { # name cn extensions
  key "$1.key"
  openssl req -new -config openssl.cnf -key "$1.key" -subj "/CN=$2" -out "$1.csr"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -set_serial "0x$(openssl rand -hex 8)" \
    -days 1 -extfile openssl.cnf -extensions "$3" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr"
}
ca ca
ca other-ca
leaf server localhost server
leaf client agent.example client

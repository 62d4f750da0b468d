#!/usr/bin/env bash
# Regenerates the offline query data in `.sqlx/` that lets the control
# service's compile-time checked queries build without a database
# (what `cargo sqlx prepare` does, without needing sqlx-cli): applies the
# migrations to a scratch SQLite file, builds the control crate against it
# with the macros told to save their data, and replaces `.sqlx/`.
# Run it after changing a query or a migration, and commit `.sqlx/`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
command -v sqlite3 > /dev/null || { echo "sqlite3 is needed (apt install sqlite3)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for m in services/control/migrations/*.sql; do
  sqlite3 "$tmp/catalog.db" < "$m"
done
mkdir -p "$tmp/sqlx"
# Touch the crate so every query macro expands again.
touch services/control/src/lib.rs
DATABASE_URL="sqlite://$tmp/catalog.db" SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$tmp/sqlx" \
  cargo build -p cowsnap-control --lib --tests
rm -rf .sqlx
mv "$tmp/sqlx" .sqlx
echo "wrote $(ls .sqlx | wc -l) queries to .sqlx/"

"""The factory provisioning station: gives each new board its trust anchors and its boarding
configuration (with an Initial Access Token) over the board's serial SMP console, checks the read-back
before the irreversible lock, and records every attempt in an append-only, hash-chained database.

Modules, one job each: `smp_link` (one exclusive serial session: timeouts from the baud rate, bounded
retries), `boarding_source` (the hub's admin API or an exported batch file), `records` (the hash chain
and the IAT claims, SQLAlchemy: SQLite or PostgreSQL), `station` (the sequence of docs/design.md §5,
concurrent over several ports), `ports` (stable by-path names), `errors` (the exception family and exit
codes) and `cli` (`mers-factory`). Of `board` only the wire format `board.protocol` is imported.
"""

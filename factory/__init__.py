"""The factory provisioning station (to come): the station sequence that gives each new board its trust
anchor and Initial Access Token over a serial SMP console, the IAT source, the append-only records
database, parallel stations, and the `mers-factory` CLI."""

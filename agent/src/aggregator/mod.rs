//! The `tally aggregator` role: ingest, ledger, chargeback, cluster view.
//! (Filled in by the aggregator issue.)

pub mod http;
pub mod metrics;
pub mod report;

//! The hub's answer codes, as the client's errors carry them: gRPC's codes,
//! which SPEC §4 uses for every bad input, in a type of the client's own so
//! that its public API does not expose the transport library's.

/// A status code of a hub answer (gRPC's; SPEC §4 names them in upper case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Code {
    /// `OK`.
    Ok,
    /// `CANCELLED`.
    Cancelled,
    /// `UNKNOWN`.
    Unknown,
    /// `INVALID_ARGUMENT`: the call is malformed; nothing of it was applied.
    InvalidArgument,
    /// `DEADLINE_EXCEEDED`.
    DeadlineExceeded,
    /// `NOT_FOUND`.
    NotFound,
    /// `ALREADY_EXISTS`.
    AlreadyExists,
    /// `PERMISSION_DENIED`: the caller may not do this.
    PermissionDenied,
    /// `RESOURCE_EXHAUSTED`: a limit was reached.
    ResourceExhausted,
    /// `FAILED_PRECONDITION`.
    FailedPrecondition,
    /// `ABORTED`.
    Aborted,
    /// `OUT_OF_RANGE`.
    OutOfRange,
    /// `UNIMPLEMENTED`.
    Unimplemented,
    /// `INTERNAL`.
    Internal,
    /// `UNAVAILABLE`: try again (after the hint, when one is given).
    Unavailable,
    /// `DATA_LOSS`.
    DataLoss,
    /// `UNAUTHENTICATED`: no valid credentials.
    Unauthenticated,
}

impl Code {
    /// The name SPEC uses, e.g. `INVALID_ARGUMENT`.
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// From the transport's code.
    pub(crate) fn from_tonic(c: tonic::Code) -> Self {
        use tonic::Code as T;
        match c {
            T::Ok => Code::Ok,
            T::Cancelled => Code::Cancelled,
            T::Unknown => Code::Unknown,
            T::InvalidArgument => Code::InvalidArgument,
            T::DeadlineExceeded => Code::DeadlineExceeded,
            T::NotFound => Code::NotFound,
            T::AlreadyExists => Code::AlreadyExists,
            T::PermissionDenied => Code::PermissionDenied,
            T::ResourceExhausted => Code::ResourceExhausted,
            T::FailedPrecondition => Code::FailedPrecondition,
            T::Aborted => Code::Aborted,
            T::OutOfRange => Code::OutOfRange,
            T::Unimplemented => Code::Unimplemented,
            T::Internal => Code::Internal,
            T::Unavailable => Code::Unavailable,
            T::DataLoss => Code::DataLoss,
            T::Unauthenticated => Code::Unauthenticated,
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transport_code_maps_to_the_code_of_the_same_number() {
        for n in 0..=16 {
            let t = tonic::Code::from_i32(n);
            let c = Code::from_tonic(t);
            assert_eq!(
                c.name().replace('_', "").to_lowercase(),
                format!("{t:?}").to_lowercase(),
                "code {n}"
            );
        }
    }
}

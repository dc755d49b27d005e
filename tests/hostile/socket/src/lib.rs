//! Opens a TCP socket through wasi:sockets: the host never links the network, so this cannot even start.
use lorahost_sdk::{Example, Filter, NoConfig, Verdict};
use wasip2::sockets::network::IpAddressFamily;

struct Phone;

impl Filter for Phone {
    type Config = NoConfig;
    fn new(_: NoConfig) -> Result<Self, String> {
        wasip2::sockets::tcp_create_socket::create_tcp_socket(IpAddressFamily::Ipv4)
            .map_err(|e| format!("socket refused: {e:?}"))?;
        Ok(Phone)
    }
    fn filter(&mut self, _: &Example) -> Verdict {
        Verdict::Keep
    }
}

lorahost_sdk::export_filter!(Phone);

import SwiftletKit
import Testing

@Suite("SwiftletKit: network interfaces")
struct NetworkLibraryTests {
    @Test("Interface names and MACs are checked before anything is built, with one line naming the interface")
    func validation() throws {
        var configuration = VMConfiguration(boot: .flat(.bytes([0xF4], name: "hlt")))
        configuration.networks = [VMConfiguration.Network(tap: "tap0"), VMConfiguration.Network(tap: "has/slash")]
        #expect(throws: SwiftletError.self) { try VM(configuration) }
        do {
            _ = try VM(configuration)
        } catch {
            #expect(error.message == "net1: 'has/slash' is not an interface name (1 to 15 bytes, no '/', ':' or spaces)")
        }
        configuration.networks = [VMConfiguration.Network(tap: "tap0", mac: "01:00:5e:00:00:01")]
        do {
            _ = try VM(configuration)
            Issue.record("a multicast MAC was accepted")
        } catch {
            #expect(error.message == "net0: '01:00:5e:00:00:01' is not a unicast MAC address (like 02:00:00:00:00:01)")
        }
    }

    @Test("The checks the command line uses", arguments: [
        ("tap0", true), ("a", true), ("fifteen-chars-x", true), ("", false), ("sixteen-chars-xx", false), (".", false),
        ("..", false), ("a b", false), ("a:b", false), ("a/b", false),
    ])
    func interfaceNames(name: String, valid: Bool) {
        #expect(VMConfiguration.Network.isValidInterfaceName(name) == valid)
    }

    @Test("MAC addresses: unicast, six pairs", arguments: [
        ("02:00:00:00:00:01", true), ("52:54:00:AB:cd:ef", true), ("01:00:5e:00:00:01", false), ("00:00:00:00:00:00", false),
        ("02:00:00:00:00", false), ("02-00-00-00-00-01", false), ("2:0:0:0:0:1", false),
    ])
    func macs(text: String, valid: Bool) {
        #expect(VMConfiguration.Network.isValidMAC(text) == valid)
    }
}

import API
import Basics
import Glibc
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// Firecracker's API socket: HTTP/1.1 on a Unix socket, served by SwiftNIO on one event
/// loop that runs on the thread "api" (started through ``APIThreads``). Each request is
/// answered by the ``APIController`` in the order it arrived.
public final class APIServer: Sendable {
    /// Firecracker's default limit on a request body (`--http-api-max-payload-size`).
    public static let defaultMaxPayload = 51_200

    public let socketPath: String
    private let channel: Mutex<Channel?>

    private init(socketPath: String, channel: Channel) {
        self.socketPath = socketPath
        self.channel = Mutex(channel)
    }

    /// Binds `socketPath` (which must not exist) and serves `controller` on it. Returns
    /// once the socket accepts connections; throws a one-line ``APIError`` otherwise.
    public static func start(socketPath: String, controller: APIController, maxPayload: Int = defaultMaxPayload,
                             metricsInterval: TimeAmount = .seconds(60)) throws -> APIServer {
        let outcome = Mutex<Result<Channel, APIError>?>(nil)
        let thread = try APIThreads.start(APIThreads.serverName) {
            MultiThreadedEventLoopGroup.withCurrentThreadAsEventLoop { loop in
                let bootstrap = ServerBootstrap(group: loop)
                    .serverChannelOption(.backlog, value: 64)
                    .childChannelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try configure(channel.pipeline.syncOperations, controller: controller, maxPayload: maxPayload)
                        }
                    }
                bootstrap.bind(unixDomainSocketPath: socketPath, cleanupExistingSocketFile: false).whenComplete { result in
                    switch result {
                    case let .success(channel):
                        loop.scheduleRepeatedTask(initialDelay: metricsInterval, delay: metricsInterval) { _ in
                            controller.flushMetrics()
                        }
                        outcome.withLock { $0 = .success(channel) }
                    case let .failure(error):
                        outcome.withLock { $0 = .failure(APIError("cannot serve the API on '\(socketPath)': \(Self.describe(error))")) }
                        loop.shutdownGracefully { _ in }
                    }
                }
            }
        }
        while true {
            if let result = outcome.withLock({ $0 }) {
                switch result {
                case let .success(channel):
                    _ = thread
                    return APIServer(socketPath: socketPath, channel: channel)
                case let .failure(error):
                    thread.join()
                    throw error
                }
            }
            usleep(500)
        }
    }

    static func describe(_ error: any Error) -> String {
        if let io = error as? IOError { return String(cString: strerror(io.errnoCode)) }
        return "\(error)"
    }

    /// The handlers of one connection: NIO's HTTP/1.1 parser and encoder, a timeout for a
    /// request that stops arriving halfway, and the request handler. Tests build the same pipeline on an `EmbeddedChannel`.
    public static func configure(_ pipeline: ChannelPipeline.SynchronousOperations, controller: APIController,
                                 maxPayload: Int, idleTimeout: TimeAmount = .seconds(60)) throws {
        try pipeline.configureHTTPServerPipeline(withPipeliningAssistance: false, withErrorHandling: false)
        try pipeline.addHandler(IdleStateHandler(readTimeout: idleTimeout))
        try pipeline.addHandler(APIHTTPHandler(controller: controller, maxPayload: maxPayload))
    }

    /// Stops accepting connections and removes the socket file.
    public func stop() {
        let channel = self.channel.withLock { channel in
            defer { channel = nil }
            return channel
        }
        try? channel?.close().wait()
        unlink(socketPath)
    }
}

/// Collects one request (head, body up to the payload limit, end), asks the controller,
/// writes its answer. A body over the limit, a parse error or a request the controller
/// refuses gets a 400 with `{"fault_message": ...}`; after a parse error or an oversized
/// body the connection is closed (its byte stream can no longer be trusted).
final class APIHTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let controller: APIController
    private let maxPayload: Int
    private var head: HTTPRequestHead?
    private var body: [UInt8] = []
    private var oversized: Int?
    private var closing = false

    init(controller: APIController, maxPayload: Int) {
        self.controller = controller
        self.maxPayload = maxPayload
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closing else { return }
        switch unwrapInboundIn(data) {
        case let .head(requestHead):
            head = requestHead
            body = []
            oversized = nil
            if let length = requestHead.headers.first(name: "content-length").flatMap(Int.init), length > maxPayload {
                oversized = length
            }
        case var .body(buffer):
            guard oversized == nil else { return }
            if body.count + buffer.readableBytes > maxPayload {
                oversized = body.count + buffer.readableBytes
                body = []
            } else {
                body += buffer.readBytes(length: buffer.readableBytes) ?? []
            }
        case .end:
            guard let requestHead = head else { return }
            head = nil
            if let size = oversized {
                respond(context, APIResponse.fault("Request payload with size \(size) is larger than the limit of \(maxPayload) allowed by server."),
                        keepAlive: false)
                return
            }
            let request = APIRequest(method: requestHead.method.rawValue, path: requestHead.uri, body: body)
            body = []
            respond(context, controller.handle(request), keepAlive: requestHead.isKeepAlive)
        }
    }

    private func respond(_ context: ChannelHandlerContext, _ response: APIResponse, keepAlive: Bool) {
        var headers = HTTPHeaders()
        headers.add(name: "Server", value: "Firecracker API")
        headers.add(name: "Connection", value: keepAlive ? "keep-alive" : "close")
        if !response.body.isEmpty { headers.add(name: "Content-Type", value: "application/json") }
        headers.add(name: "Content-Length", value: "\(response.body.count)")
        let status = HTTPResponseStatus(statusCode: response.status)
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        if !response.body.isEmpty {
            var buffer = context.channel.allocator.buffer(capacity: response.body.count)
            buffer.writeBytes(response.body)
            context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        }
        if keepAlive {
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        } else {
            closing = true
            let channel = context.channel
            let written = context.eventLoop.makePromise(of: Void.self)
            written.futureResult.whenComplete { _ in channel.close(promise: nil) }
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: written)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard !closing else { return }
        if error is HTTPParserError {
            respond(context, .fault("Invalid HTTP request: \(error)"), keepAlive: false)
        } else {
            closing = true
            context.close(promise: nil)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            // Only a request left half-sent is given up on; an idle keep-alive
            // connection between requests stays open, as Firecracker keeps it.
            guard head != nil else { return }
            closing = true
            context.close(promise: nil)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }
}
